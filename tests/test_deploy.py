"""Containers and orchestration: docker/, docker-compose.yml (all profiles), deploy/nginx, deploy/k8s.

There is no Docker engine or cluster here, so the files are checked offline: the compose file
against the Compose Specification's JSON schema (vendored in check-jsonschema), the Kubernetes
manifests against the API's JSON schemas (shipped in kubernetes-validate, strict: unknown fields
are errors), the nginx config with `nginx -t` where nginx is installed, and the commands the
Dockerfiles run (the CPU requirements list, the health check) are run here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy/k8s"
SERVICE_NAME = "nextword.v1.NextWord"
GRPC_PORT = 50051
METRICS_PORT = 9100
# Kubernetes versions the manifests must be valid for: the oldest supported here and the newest
# the validator knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())


# ------------------------------------------------------------------ helpers


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services(profile: str | None) -> dict[str, dict[str, Any]]:
    """The services of one profile (None: those without a profile, which always run)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if (profile is None and "profiles" not in svc) or profile in svc.get("profiles", [])
    }


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with its vendored Compose Specification schema (no download)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, args = line.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def run_commands(path: Path) -> list[list[str]]:
    """Every shell command of every RUN, split into words (`&&` separates commands)."""
    commands: list[list[str]] = []
    for op, args in dockerfile_instructions(path):
        if op == "RUN":
            current: list[str] = []
            for word in shlex.split(args):
                if word == "&&":
                    commands.append(current)
                    current = []
                else:
                    current.append(word)
            commands.append(current)
    return commands


def pip_installs(path: Path) -> list[list[str]]:
    return [cmd[2:] for cmd in run_commands(path) if cmd[:2] == ["pip", "install"]]


def python_checks(path: Path) -> list[str]:
    """The `python -c` scripts the build runs."""
    return [cmd[2] for cmd in run_commands(path) if cmd[:2] in (["python", "-c"], ["python3", "-c"])]


def instruction(path: Path, name: str) -> str:
    """The arguments of the last `name` instruction (the one that counts)."""
    found = [args for op, args in dockerfile_instructions(path) if op == name]
    assert found, f"{path.name} has no {name}"
    return found[-1]


def healthcheck_command(path: Path) -> list[str]:
    args = instruction(path, "HEALTHCHECK")
    command: list[str] = json.loads(args[args.index("CMD ") + 4 :])
    return command


def project_dependencies(extra: str = "") -> list[str]:
    """pyproject.toml's base dependencies, or those of ``extra``."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps: list[str] = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return deps


def dist_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group().lower()


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    """Every manifest file of deploy/k8s but the kustomization, with its documents."""
    return {
        f.name: [doc for doc in yaml.safe_load_all(f.read_text()) if doc]
        for f in sorted(K8S.glob("*.yaml"))
        if f.name != "kustomization.yaml"
    }


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    [obj] = [
        doc
        for docs in k8s_documents().values()
        for doc in docs
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    return obj


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ------------------------------------------------------------------ docker-compose.yml


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key in a profile's service fails it."""
    data = compose()
    device = data["services"]["server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    device["capabilitiez"] = device.pop("capabilities")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    result = check_compose_schema(broken)
    assert result.returncode != 0 and "capabilitiez" in result.stdout + result.stderr


def test_compose_default_services_and_profiles() -> None:
    assert set(services(None)) == {"server", "gateway", "prometheus", "grafana"}
    gateway = services(None)["gateway"]
    assert gateway["image"] == services(None)["server"]["image"]  # the same image, another command
    assert gateway["entrypoint"][:2] == ["nextword", "gateway"] and "server:50051" in gateway["entrypoint"]
    assert set(services("gpu")) == {"server-gpu"}
    assert set(services("replicas")) == {"replica-1", "replica-2", "redis", "balancer", "prometheus-replicas"}
    # Every service of every profile at once: no host port published twice.
    published = [
        str(port).rsplit(":", 1)[0] for svc in compose()["services"].values() for port in svc.get("ports", [])
    ]
    assert len(published) == len(set(published)), published
    # Every file mounted from the checkout exists.
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}"


def test_compose_gpu_profile() -> None:
    gpu = services("gpu")["server-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert (ROOT / gpu["build"]["dockerfile"]).is_file()
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = " ".join(gpu["command"])
    assert "--device cuda" in command and "--workers 4" in command and "--max-batch 1024" in command


def test_compose_replicas_profile() -> None:
    svcs = services("replicas")
    replicas = sorted(name for name in svcs if name.startswith("replica-"))
    assert replicas == ["replica-1", "replica-2"]
    for name in replicas:
        svc = svcs[name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"  # the CPU image
        command = " ".join(svc["command"])
        assert "--workers auto" in command
        assert "--session-store redis://redis:6379/0" in command
        assert "redis" in svc["depends_on"]
        assert "ports" not in svc  # reached through the balancer only
    assert svcs["redis"]["image"].startswith("redis:7-alpine")

    balancer = svcs["balancer"]
    assert balancer["image"] == "nginx:1.27"
    assert "8080:8080" in balancer["ports"]
    [mount] = balancer["volumes"]
    source, target = mount.split(":")[:2]
    assert target == "/etc/nginx/conf.d/default.conf"
    conf = (ROOT / source).read_text()
    block = re.search(r"^upstream nextword \{(.*?)^\}", conf, flags=re.MULTILINE | re.DOTALL)
    assert block, "no `upstream nextword` block"
    upstream = re.findall(r"^\s*server\s+([^\s;]+)[^;]*;", block.group(1), flags=re.MULTILINE)
    assert upstream == [f"{name}:{GRPC_PORT}" for name in replicas]
    assert re.search(r"^\s*listen\s+8080\s+http2;", conf, flags=re.MULTILINE)
    assert "grpc_pass grpc://nextword;" in conf

    # The replicas' Prometheus scrapes each of them.
    [prom_mount] = [v for v in svcs["prometheus-replicas"]["volumes"] if v.endswith("prometheus.yml:ro")]
    prom = yaml.safe_load((ROOT / prom_mount.split(":")[0]).read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{name}:{METRICS_PORT}" for name in replicas]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_compose_balancer_config_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` on the balancer's config, inside an http {} block as the official image reads it.

    The replicas' names resolve only on the compose network, so they become 127.0.0.1 here.
    """
    conf = (ROOT / "deploy/nginx/nextword-compose.conf").read_text()
    (tmp_path / "site.conf").write_text(re.sub(r"replica-\d+", "127.0.0.1", conf))
    temp_paths = " ".join(
        f"{kind}_temp_path {tmp_path}/{kind};" for kind in ("proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n  access_log off;\n"
        f"  client_body_temp_path {tmp_path}/body; {temp_paths}\n  include {tmp_path}/site.conf;\n}}\n"
    )
    nginx = shutil.which("nginx")
    assert nginx
    result = subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ Dockerfiles


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the image's script reads pyproject.toml with tomllib")
def test_cpu_dockerfile_requirements_swap_onnxruntime_gpu_for_onnxruntime() -> None:
    """Run the CPU image's requirements script on pyproject.toml: every base dependency, with the
    CPU onnxruntime at the pinned version instead of onnxruntime-gpu."""
    dockerfile = ROOT / "docker/Dockerfile"
    [script] = [s for s in python_checks(dockerfile) if "tomllib" in s]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    requirements = [line for line in result.stdout.splitlines() if line.strip()]
    names = [dist_name(r) for r in requirements]
    assert "onnxruntime-gpu" not in names
    deps = project_dependencies()
    [cpu_pin] = [d.split(";")[0].strip() for d in deps if dist_name(d) == "onnxruntime"]
    assert cpu_pin in requirements and re.fullmatch(r"onnxruntime==\d+\.\d+\.\d+", cpu_pin)
    web = project_dependencies("web")  # the gateway's
    assert set(names) == {dist_name(d) for d in [*deps, *web]} - {"onnxruntime-gpu"}


def test_cpu_dockerfile_installs_no_onnxruntime_gpu_and_no_torch() -> None:
    dockerfile = ROOT / "docker/Dockerfile"
    assert instruction(dockerfile, "FROM") == "python:3.11-slim"
    installs = pip_installs(dockerfile)
    assert installs == [["-r", "/tmp/requirements-cpu.txt"], ["--no-deps", "."]]
    for args in installs:
        assert not any("onnxruntime-gpu" in a or "[" in a for a in args), args
    checks = python_checks(dockerfile)
    assert any("find_spec('torch') is not None" in c for c in checks)
    assert any("'onnxruntime-gpu' not in names" in c for c in checks)
    assert instruction(dockerfile, "ENTRYPOINT") == '["nextword", "serve", "--host", "0.0.0.0"]'
    assert json.loads(instruction(dockerfile, "CMD")) == ["--port", "50051", "--metrics-port", "9100"]


def test_gpu_dockerfile_installs_onnxruntime_gpu_on_cuda() -> None:
    dockerfile = ROOT / "docker/Dockerfile.gpu"
    base = instruction(dockerfile, "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    assert match, base
    assert pip_installs(dockerfile) == [["."]]  # the declared dependencies: onnxruntime-gpu on Linux x86_64
    assert any("onnxruntime-gpu" in d and "Linux" in d for d in project_dependencies())
    checks = python_checks(dockerfile)
    assert any("'onnxruntime-gpu' in names" in c for c in checks)
    assert any("find_spec('torch') is not None" in c for c in checks)
    assert instruction(dockerfile, "ENTRYPOINT") == '["nextword", "serve", "--host", "0.0.0.0"]'
    command = json.loads(instruction(dockerfile, "CMD"))
    assert command[command.index("--device") + 1] == "cuda"


def test_gpu_base_image_matches_the_onnxruntime_gpu_build() -> None:
    """The CUDA major version of the base image is the one the pinned onnxruntime-gpu was built for."""
    from importlib import metadata

    [pin] = [d.split(";")[0].strip() for d in project_dependencies() if dist_name(d) == "onnxruntime-gpu"]
    try:
        installed = metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if pin != f"onnxruntime-gpu=={installed}":
        pytest.skip(f"installed onnxruntime-gpu {installed} is not the pinned {pin}")
    from onnxruntime.capi import build_and_package_info

    base = instruction(ROOT / "docker/Dockerfile.gpu", "FROM")
    match = re.match(r"nvidia/cuda:(\d+)\.", base)
    assert match and build_and_package_info.cuda_version.split(".")[0] == match.group(1)


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    """The demo model served on a free port, as the image serves it (its own loop, in a thread)."""
    from nextword.server.config import ServerConfig
    from tests.servers import in_thread

    with in_thread(ServerConfig(port=0, metrics_port=0, device="cpu")) as target:
        yield target


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.gpu"])
def test_image_healthcheck_asks_grpc_health(dockerfile: str, demo_server: str) -> None:
    """The HEALTHCHECK command exits 0 against a serving server and non-zero where none answers."""
    command = healthcheck_command(ROOT / dockerfile)
    assert command[:2] == ["python", "-c"] and "HealthStub" in command[2] and SERVICE_NAME in command[2]

    def check(target: str) -> int:
        env = {**os.environ, "NEXTWORD_HEALTH_TARGET": target}
        return subprocess.run(
            [sys.executable, "-c", command[2]], env=env, capture_output=True, timeout=30
        ).returncode

    assert check(demo_server) == 0
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        assert check(f"127.0.0.1:{closed.getsockname()[1]}") != 0


# ------------------------------------------------------------------ deploy/k8s


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = k8s_documents()
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "redis.yaml"}
    for name, objects in docs.items():
        assert objects, name
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
            assert "namespace" not in obj["metadata"], f"{name}: the namespace is kubectl -n's choice"


def test_k8s_schema_check_rejects_a_broken_manifest() -> None:
    """Strict schemas: a misspelt probe field is an error, not ignored."""
    deployment = k8s_object("Deployment", "nextword")
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    probe["grcp"] = probe.pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization
    assert sorted(kustomization["resources"]) == sorted(k8s_documents())


def test_k8s_deployment_probes_and_shutdown() -> None:
    from nextword.server.config import ServerConfig

    deployment = k8s_object("Deployment", "nextword")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    args = container["args"]
    assert f"--port={GRPC_PORT}" in args and f"--metrics-port={METRICS_PORT}" in args
    assert "--workers=auto" in args
    assert "--session-store=redis://nextword-redis:6379/0" in args

    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == GRPC_PORT, kind
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""
    assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["startupProbe"]["grpc"]["service"] == SERVICE_NAME

    assert pod["terminationGracePeriodSeconds"] > ServerConfig().grace
    assert "lifecycle" not in container  # the server drains on SIGTERM: no preStop needed
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    assert resources["requests"] == resources["limits"]  # Guaranteed: pinned cores where the kubelet pins
    assert selects(
        deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
    )


def test_k8s_service_hpa_pdb_and_redis_point_at_the_right_pods() -> None:
    deployment = k8s_object("Deployment", "nextword")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    redis = k8s_object("Deployment", "nextword-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]

    service = k8s_object("Service", "nextword")
    assert selects(service["spec"]["selector"], pod_labels)
    assert not selects(service["spec"]["selector"], redis_labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["port"] == METRICS_PORT

    hpa = k8s_object("HorizontalPodAutoscaler", "nextword")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "nextword",
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = k8s_object("PodDisruptionBudget", "nextword")
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert not selects(pdb["spec"]["selector"]["matchLabels"], redis_labels)

    redis_service = k8s_object("Service", "nextword-redis")
    assert selects(redis_service["spec"]["selector"], redis_labels)
    assert not selects(redis_service["spec"]["selector"], pod_labels)
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [6379]
    [redis_container] = redis["spec"]["template"]["spec"]["containers"]
    assert redis_container["image"].startswith("redis:7-alpine")
