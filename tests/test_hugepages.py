"""The server's memory in transparent huge pages: when it restarts itself for them, and that it does."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import pytest

from nextword.server.hugepages import TUNABLE, environment, thp_mode
from tests.conftest import nextword_popen

SERVING = re.compile(r"nextword serving \S+ \([^)]*?(\d+) MiB in huge pages\)")


def test_the_tunable_is_added_once_and_only_where_the_kernel_gives_huge_pages_on_request() -> None:
    assert environment({"PATH": "/bin"}, "madvise") == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert environment(other, "madvise") == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1"}
    assert environment({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "madvise") is None  # the operator said no
    assert environment({"GLIBC_TUNABLES": f"{TUNABLE}=1"}, "madvise") is None  # restarted already
    for mode in ("always", "never", ""):  # huge pages everywhere, nowhere, or no such kernel setting
        assert environment({}, mode) is None


def test_thp_mode_reads_the_bracketed_setting(tmp_path: Path) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert thp_mode(setting) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert thp_mode(setting) == "always"
    assert thp_mode(tmp_path / "missing") == ""


def _serve(bundle: Path, *args: str) -> tuple[dict[str, str], int]:
    """Start ``nextword serve``; its environment as the kernel shows it (read through the pid the
    process started with) and the MiB its log says are in huge pages; then stop it."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    cmd = ["serve", "--model", str(bundle), "--port", "0", "--metrics-port", "0", "--threads", "1", *args]
    with nextword_popen(cmd, SERVING, env) as (match, proc):
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        seen = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        return seen, int(match.group(1))


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or platform.libc_ver()[0] != "glibc"
    or tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2]) < (2, 35)
    or thp_mode() != "madvise",
    reason="needs Linux, glibc 2.35+ and transparent huge pages on madvise",
)
def test_serve_restarts_itself_in_place_with_its_weights_in_huge_pages(tiny_bundle: Path) -> None:
    env, huge = _serve(tiny_bundle)
    assert f"{TUNABLE}=1" in env.get("GLIBC_TUNABLES", "")  # the same pid, restarted with the tunable
    assert huge > 0
    env, huge = _serve(tiny_bundle, "--no-huge-pages")
    assert "GLIBC_TUNABLES" not in env and huge == 0


def test_a_restart_that_fails_leaves_the_server_serving_in_small_pages(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nextword.server import hugepages

    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "_glibc_takes_the_tunable", lambda: True)
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(hugepages.os, "execve", refuse)
    hugepages.restart_with_huge_pages()  # returns: the caller goes on serving
    assert "cannot restart for huge pages (Permission denied)" in capsys.readouterr().err
