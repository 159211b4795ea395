"""Real Redis and nginx instances on loopback ports, for tests (helpers: nothing here is a test).

    with redis_server(tmp_path) as redis_proc:
        store = redis.Redis.from_url(redis_proc.url)
        redis_proc.kill(); redis_proc.restart()          # same port, empty (no persistence)

    with nginx_grpc(tmp_path, ["127.0.0.1:50051", "127.0.0.1:50052"]) as balancer:
        NextWordClient(balancer.target).predict("once upon a ")

The binaries come from Debian's packages: ``ensure_installed("redis", "nginx")`` runs
``scripts/install-services.sh`` for the ones missing and raises (never skips) when that fails.

nginx runs ``deploy/nginx/nextword.conf`` itself: ``render_nginx_conf`` changes only the lines
that differ between machines (the listen port, the upstream ``server`` lines, and the pid, log
and temp paths, pointed into the test's folder so that a non-root nginx can run it) and fails
when it cannot find each of them exactly once, so a test never runs some other configuration.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

__all__ = [
    "NGINX_CONF",
    "NginxProcess",
    "RedisProcess",
    "ensure_installed",
    "free_port",
    "nginx_grpc",
    "redis_server",
    "render_nginx_conf",
    "wait_for_port",
]

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / "scripts" / "install-services.sh"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nextword.conf"
# The service names of scripts/install-services.sh and the binary each one installs.
BINARIES = {"redis": "redis-server", "nginx": "nginx", "prometheus": "promtool", "chromium": "chromium"}
# Where Debian puts them; a non-root PATH often lacks the sbin folders.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # a free port may be taken by someone else before the service binds it


def find_binary(binary: str) -> str | None:
    """The path of ``binary`` on PATH or in the system folders; None if it is nowhere."""
    return shutil.which(binary) or shutil.which(binary, path=os.pathsep.join(SYSTEM_DIRS))


def ensure_installed(*names: str) -> dict[str, str]:
    """Install the services ``names`` (redis, nginx, prometheus, chromium) that are missing; their paths.

    Runs scripts/install-services.sh for the missing ones only; raises RuntimeError with its
    output when it fails or the binary is still missing after it.
    """
    unknown = [name for name in names if name not in BINARIES]
    if unknown:
        raise ValueError(f"unknown services {unknown} (known: {sorted(BINARIES)})")
    missing = [name for name in names if find_binary(BINARIES[name]) is None]
    if missing:
        result = subprocess.run(
            ["bash", str(INSTALL_SCRIPT), *missing],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{INSTALL_SCRIPT.name} {' '.join(missing)} failed (exit {result.returncode}):\n"
                f"{result.stdout}"
            )
        still = [name for name in missing if find_binary(BINARIES[name]) is None]
        if still:
            raise RuntimeError(
                f"{INSTALL_SCRIPT.name} {' '.join(missing)} succeeded but "
                f"{', '.join(BINARIES[name] for name in still)} is still not found:\n{result.stdout}"
            )
    paths = {name: find_binary(BINARIES[name]) for name in names}
    return {name: path for name, path in paths.items() if path is not None}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; raise if ``process`` exits or it takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _accepts(port):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}) before serving:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} does not accept connections on port {port}:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return f"(no {path})"


def _end(process: subprocess.Popen[bytes], sig: signal.Signals, *, group: bool = False) -> None:
    """Send ``sig`` (if the process still runs) and wait for it; SIGKILL it if it takes too long.

    ``group``: the process leads its own process group (its children too get the SIGKILL).
    """
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- redis


class RedisProcess:
    """A ``redis-server`` on 127.0.0.1:``port`` with no persistence, its files in ``directory``."""

    def __init__(self, binary: str, port: int, directory: Path) -> None:
        self.binary = binary
        self.port = port
        self.directory = directory
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] = self._spawn()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)]
        # No RDB snapshots, no AOF: a restart comes back empty, as a lost store would.
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        with self.log.open("ab") as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        """Return once the server answers PING; raise if it exits or does not within the timeout."""
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited ({self.process.returncode}) on port {self.port}:\n"
                        f"{_tail(self.log)}"
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server does not answer PING on port {self.port}:\n{_tail(self.log)}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        _end(self.process, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        _end(self.process, signal.SIGKILL)

    def restart(self) -> None:
        """Start again on the same port (stopping it first if it still runs); return once it answers PING."""
        self.stop()
        self.process = self._spawn()
        self.wait_ready()


@contextlib.contextmanager
def redis_server(tmp_dir: Path) -> Iterator[RedisProcess]:
    """A real ``redis-server`` on a free loopback port, answering PING; stopped at exit."""
    binary = ensure_installed("redis")["redis"]
    directory = Path(tmp_dir) / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(START_ATTEMPTS):
        server = RedisProcess(binary, free_port(), directory)
        try:
            server.wait_ready()
            break
        except RuntimeError:
            server.kill()
            if attempt == START_ATTEMPTS - 1:
                raise
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- nginx

_TEMP_PATHS = (
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
)
_REPLICAS = re.compile(r"^([ \t]*# replicas: begin[ \t]*\n)(.*?)(^[ \t]*# replicas: end[ \t]*$)", re.M | re.S)
_SERVER = re.compile(r"^([ \t]*)server[ \t]+(\S+?)((?:[ \t]+[^;\n]+)?);[ \t]*$", re.M)


def _quoted(path: Path) -> str:
    text = str(path)
    if any(ch in text for ch in '"\\;{}\n'):
        raise ValueError(f"a path nginx cannot be given as a quoted string: {text!r}")
    return f'"{text}"'


def _set_argument(conf: str, directive: str, value: str) -> str:
    """``conf`` with the first argument of its one ``directive`` line replaced by ``value`` (the other
    arguments stay); raise unless there is exactly one such line (comment lines do not count)."""
    pattern = rf"^([ \t]*{directive}[ \t]+)(?:\"[^\"\n]*\"|[^\s;]+)(?=[\s;])"
    new, count = re.subn(pattern, lambda match: match.group(1) + value, conf, flags=re.M)
    if count != 1:
        raise ValueError(f"{NGINX_CONF.name}: expected exactly one {directive} line, found {count}")
    return new


def render_nginx_conf(conf: str, *, port: int, upstreams: list[str], directory: Path) -> str:
    """``conf`` (deploy/nginx/nextword.conf's text) listening on 127.0.0.1:``port``, balancing over
    ``upstreams`` (HOST:PORT each), its pid, logs and temp folders in ``directory``.

    Only those lines change; each must be found exactly once (the upstreams between the
    ``# replicas: begin`` and ``# replicas: end`` markers), or ValueError says which is not.
    """
    if not upstreams:
        raise ValueError("nginx needs at least one upstream")
    out = _set_argument(conf, "pid", _quoted(directory / "nginx.pid"))
    # The log lines keep their level and format; only the file changes.
    out = _set_argument(out, "error_log", _quoted(directory / "error.log"))
    out = _set_argument(out, "access_log", _quoted(directory / "access.log"))
    for name in _TEMP_PATHS:
        out = _set_argument(out, name, _quoted(directory / "temp" / name.removesuffix("_temp_path")))
    # The port, on loopback only; the listen parameters (http2, ...) stay.
    out = _set_argument(out, "listen", f"127.0.0.1:{port}")

    blocks = list(_REPLICAS.finditer(out))
    if len(blocks) != 1:
        raise ValueError(
            f"{NGINX_CONF.name}: expected one '# replicas: begin/end' block, found {len(blocks)}"
        )
    block = blocks[0]
    first = _SERVER.search(block.group(2))
    if first is None:
        raise ValueError(f"{NGINX_CONF.name}: no 'server HOST:PORT ...;' line between the replicas markers")
    indent, params = first.group(1), first.group(3)
    lines = "".join(f"{indent}server {upstream}{params};\n" for upstream in upstreams)
    return out[: block.start(2)] + lines + out[block.end(2) :]


class NginxProcess:
    """nginx running a rendered deploy/nginx/nextword.conf in the foreground, on 127.0.0.1:``port``."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, conf: Path, directory: Path) -> None:
        self.process = process
        self.port = port
        self.conf = conf
        self.directory = directory
        self.error_log = directory / "error.log"
        self.access_log = directory / "access.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: open streams are cut) and wait; then SIGKILL to whatever
        is left of its process group (a worker outlives a master that was killed)."""
        _end(self.process, signal.SIGTERM, group=True)


def _nginx_command(binary: str, conf: Path, directory: Path) -> list[str]:
    # In the foreground, so that the test owns the master process. Started as root, nginx would
    # run its workers as nobody, who cannot enter the test's private folder: run them as root.
    globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    # -e: the log of nginx's own startup, before it reads error_log (the compiled-in one is
    # not writable by a non-root nginx).
    return [binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"), "-g", globals_]


@contextlib.contextmanager
def nginx_grpc(tmp_dir: Path, upstreams: list[str]) -> Iterator[NginxProcess]:
    """nginx balancing gRPC over ``upstreams`` (HOST:PORT each) with deploy/nginx/nextword.conf, on a
    free loopback port; the config is checked with ``nginx -t`` first. Stopped at exit."""
    binary = ensure_installed("nginx")["nginx"]
    directory = Path(tmp_dir) / "nginx"
    (directory / "temp").mkdir(parents=True, exist_ok=True)
    conf = directory / "nextword.conf"
    template = NGINX_CONF.read_text(encoding="utf-8")
    balancer: NginxProcess | None = None
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        conf.write_text(render_nginx_conf(template, port=port, upstreams=upstreams, directory=directory))
        command = _nginx_command(binary, conf, directory)
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(
                f"nginx -t rejects {conf} (rendered from {NGINX_CONF}):\n{check.stderr}{check.stdout}"
            )
        log = directory / "nginx.out"
        with log.open("ab") as out:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        balancer = NginxProcess(process, port, conf, directory)
        try:
            wait_for_port(port, process, "nginx", balancer.error_log)
            break
        except RuntimeError:
            balancer.stop()
            if attempt == START_ATTEMPTS - 1:
                raise
    assert balancer is not None
    try:
        yield balancer
    finally:
        balancer.stop()
