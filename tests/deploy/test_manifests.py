"""Static checks of the deployment files: Kubernetes manifests, the compose file, Dockerfiles.

No cluster and no Docker engine: every file is parsed, the manifests are validated against the
Kubernetes JSON schemas bundled with ``kubernetes-validate`` (strict: unknown fields fail), and
every ``RTCONTOUR_*`` variable named in docker/ and deploy/ must be a field of
``common.settings.Settings``, so a typo fails here rather than being ignored in production.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: deployment checks skipped")

from rtcontour.common.settings import Settings  # noqa: E402 - after the skip guard

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.29.0"  # bundled by kubernetes-validate >= 1.29
SECRET_TEMPLATE = "secret.example.yaml"
RTCONTOUR_COMPONENTS = ("listener", "api", "worker")
ENV_VAR = re.compile(r"\bRTCONTOUR_[A-Z0-9_]+\b")
PLACEHOLDER_TOKEN = "placeholder-" + "0" * 52  # as long as `openssl rand -hex 32`
PLACEHOLDER_ENV = {"POSTGRES_PASSWORD": "placeholder", "RTCONTOUR_ADMIN_TOKEN": PLACEHOLDER_TOKEN}

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[str, Doc]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.name}:{doc.get('kind')}/{doc['metadata']['name']}", doc))
    return docs


def _workloads() -> dict[str, Doc]:
    """Deployments and StatefulSets by ``app.kubernetes.io/component`` label."""
    found = {}
    for _, doc in _documents():
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            found[doc["metadata"]["labels"]["app.kubernetes.io/component"]] = doc
    return found


def _containers() -> list[tuple[str, Doc, Doc]]:
    """(id, pod spec, container) for every container of every workload."""
    result = []
    for component, workload in _workloads().items():
        pod = workload["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            result.append((f"{component}/{container['name']}", pod, container))
    return result


def _by_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in _documents() if doc["kind"] == kind]


def _load_compose() -> Doc:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build Settings from exactly ``env`` (the test process's RTCONTOUR_* are removed)."""
    import os

    for name in list(os.environ):
        if name.startswith("RTCONTOUR_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def _kubernetes_env(container: Doc) -> dict[str, str]:
    """The container's environment as the kubelet builds it, secrets as placeholders."""
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in _by_kind("ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:  # $(VAR) refers to a variable defined earlier
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                value = PLACEHOLDER_ENV.get(item["name"], "placeholder")
            else:
                value = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        env[item["name"]] = value
    return env


def _interpolate_compose(node: Any) -> Any:
    """Resolve ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` in parsed compose
    values, as ``docker compose`` does (after YAML parsing, so ``${X:-}`` is an empty string).
    """
    if isinstance(node, dict):
        return {key: _interpolate_compose(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_compose(value) for value in node]
    if not isinstance(node, str):
        return node

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in PLACEHOLDER_ENV:
            return PLACEHOLDER_ENV[name]
        if op == ":?":
            raise AssertionError(f"compose requires ${{{name}}} but the test has no value")
        return arg if op == ":-" else ""

    return re.sub(r"\$\$|\$\{(\w+)(:[-?])?([^}]*)\}", resolve, node)


DOCUMENT_IDS = [doc_id for doc_id, _ in _documents()]
CONTAINER_IDS = [cid for cid, _, _ in _containers()]
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_parses_as_yaml_documents_with_kind_and_name(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
        assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} without a name"


@pytest.mark.parametrize(("doc_id", "doc"), _documents(), ids=DOCUMENT_IDS)
def test_manifest_validates_against_kubernetes_schema(doc_id: str, doc: Doc) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate): "
        "schema validation skipped",
    )
    from jsonschema.exceptions import ValidationError  # kubernetes-validate depends on it

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except ValidationError as exc:
        where = "/".join(str(part) for part in exc.path)
        pytest.fail(f"{doc_id} invalid for Kubernetes {KUBERNETES_VERSION} at {where}: "
                    f"{exc.message}")


def test_kustomization_lists_every_manifest_except_the_secret_template() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    expected = {p.name for p in _manifest_files()} - {SECRET_TEMPLATE}
    assert set(kustomization["resources"]) == expected
    assert kustomization["namespace"] == "rtcontour"
    for _, doc in _documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "rtcontour", doc["metadata"]["name"]


def test_every_secret_key_referenced_is_in_the_secret_template() -> None:
    (secret,) = _by_kind("Secret")
    keys = set(secret["stringData"])
    for cid, _, container in _containers():
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"], cid
                assert ref["key"] in keys, f"{cid} reads missing secret key {ref['key']!r}"
    assert all(value.startswith("REPLACE") for value in secret["stringData"].values()), (
        "the Secret template must hold placeholders, never real secrets"
    )


@pytest.mark.parametrize(("cid", "pod", "container"), _containers(), ids=CONTAINER_IDS)
def test_container_has_cpu_and_memory_requests_and_limits(
    cid: str, pod: Doc, container: Doc
) -> None:
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources.get(kind, {}).keys(), f"{cid}: no {kind}"


@pytest.mark.parametrize(("cid", "pod", "container"), _containers(), ids=CONTAINER_IDS)
def test_container_has_liveness_probe_and_readiness_probe_when_serving(
    cid: str, pod: Doc, container: Doc
) -> None:
    assert "livenessProbe" in container, f"{cid}: no livenessProbe"
    if container.get("ports"):
        assert "readinessProbe" in container, f"{cid} serves a port but has no readinessProbe"


@pytest.mark.parametrize(("cid", "pod", "container"), _containers(), ids=CONTAINER_IDS)
def test_container_runs_as_non_root_without_capabilities(
    cid: str, pod: Doc, container: Doc
) -> None:
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cid
    assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, cid
    assert sc.get("allowPrivilegeEscalation") is False, cid
    assert sc.get("readOnlyRootFilesystem") is True, cid
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], cid
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", cid
    # Service links would inject e.g. RTCONTOUR_API_PORT=tcp://... for Service rtcontour-api.
    assert pod.get("enableServiceLinks") is False, cid


def test_listener_is_single_replica_probed_over_tcp_on_the_dicom_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener = _workloads()["listener"]
    assert listener["spec"]["replicas"] == 1
    assert listener["spec"]["strategy"]["type"] == "Recreate"
    (container,) = listener["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "dicom", "containerPort": 11112},
                                  {"name": "metrics", "containerPort": 9112}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] in {"dicom", 11112}, probe
    # Scaled out, the DICOM counters live in the listener's process: it serves them itself.
    settings = _settings_from_env(_kubernetes_env(container), monkeypatch)
    assert (settings.listener_metrics_port, settings.listener_metrics_host) == (9112, "0.0.0.0")


def test_api_is_probed_over_http_on_health() -> None:
    (container,) = _workloads()["api"]["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] in {"http", 8000}, probe


def test_worker_requests_one_gpu_and_is_scheduled_on_gpu_nodes() -> None:
    pod = _workloads()["worker"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "worker-gpu" in container["image"]
    # A surge pod would sit Pending for a GPU the old pod holds: the rollout would never end.
    assert _workloads()["worker"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]


def test_worker_probes_ping_the_celery_node_name_rtcontour_worker_uses() -> None:
    source = (ROOT / "worker" / "celery_app.py").read_text()
    assert 'default=f"rtcontour@{socket.gethostname()}"' in source, (
        "rtcontour worker's default Celery node name changed: update the worker probes in "
        "deploy/worker.yaml and docker/compose.yaml"
    )
    (container,) = _workloads()["worker"]["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe"):
        assert '--destination "rtcontour@$HOSTNAME"' in container[probe]["exec"]["command"][-1]
    compose_probe = _load_compose()["services"]["worker"]["healthcheck"]["test"][-1]
    assert '--destination "rtcontour@$$HOSTNAME"' in compose_probe


def test_services_select_existing_pods_and_target_declared_ports() -> None:
    workloads = _workloads().values()
    for service in _by_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [
            w for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {matches}"
        ports = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
    types = {s["metadata"]["name"]: s["spec"]["type"] for s in _by_kind("Service")}
    assert types["rtcontour-dicom"] in {"LoadBalancer", "NodePort"}
    assert types["rtcontour-api"] == "ClusterIP"


def test_every_rtcontour_pod_mounts_the_read_write_many_data_volume_at_data_dir() -> None:
    (claim,) = _by_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (settings_map,) = _by_kind("ConfigMap")
    data_dir = settings_map["data"]["RTCONTOUR_DATA_DIR"]
    for component in RTCONTOUR_COMPONENTS:
        pod = _workloads()[component]["spec"]["template"]["spec"]
        volumes = {
            v["name"] for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        }
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]
                  if m["name"] in volumes}
        assert mounts == {data_dir}, f"{component} mounts the shared data volume at {mounts}"


@pytest.mark.parametrize("component", RTCONTOUR_COMPONENTS)
def test_kubernetes_environment_is_valid_production_settings(
    component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = _workloads()[component]["spec"]["template"]["spec"]["containers"]
    settings = _settings_from_env(_kubernetes_env(container), monkeypatch)
    assert settings.mode == "production"
    assert settings.admin_token is not None
    assert str(settings.data_dir) == "/data"
    assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.api_host == "0.0.0.0" and settings.dicom_host == "0.0.0.0"


# ---------------------------------------------------------------- every RTCONTOUR_* is real


def test_every_rtcontour_variable_in_deployment_files_is_a_settings_field() -> None:
    fields = {f"RTCONTOUR_{name.upper()}" for name in Settings.model_fields}
    used: dict[str, set[str]] = {}
    for path in sorted([*DOCKER.rglob("*"), *DEPLOY.rglob("*")]):
        if path.is_file():
            for name in ENV_VAR.findall(path.read_text()):
                used.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    assert len(used) >= 10, "suspiciously few RTCONTOUR_* variables found"
    unknown = {name: sorted(files) for name, files in used.items() if name not in fields}
    assert not unknown, f"not fields of common.settings.Settings: {unknown}"


# ---------------------------------------------------------------- compose


def test_compose_references_only_defined_services_volumes_and_dockerfiles() -> None:
    compose = _load_compose()
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    assert {"redis", "postgres", "listener", "api", "worker"} <= services.keys()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        if "build" in service:
            dockerfile = (DOCKER / service["build"]["context"] / service["build"]["dockerfile"])
            assert dockerfile.resolve().is_file(), f"{name}: {dockerfile} missing"
        assert "healthcheck" in service or "image" in service, name
    assert "volumes" in services["postgres"] and "healthcheck" in services["postgres"]


def test_compose_listener_api_and_workers_share_the_data_volume_at_data_dir() -> None:
    compose = _load_compose()
    rtcontour = [n for n, s in compose["services"].items() if "build" in s]
    assert {"listener", "api", "worker"} <= set(rtcontour)
    for name in rtcontour:
        service = compose["services"][name]
        assert "rtcontour-data:/data" in service["volumes"], name
        assert service["environment"]["RTCONTOUR_DATA_DIR"] == "/data", name


def test_compose_gpu_worker_reserves_an_nvidia_gpu() -> None:
    worker = _load_compose()["services"]["worker"]
    assert "worker-gpu" in worker["build"]["dockerfile"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_has_no_default_for_secrets_in_production() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for name in PLACEHOLDER_ENV:
        assert f"${{{name}:?" in text, f"{name} must be required (${{{name}:?...}})"
        assert f"${{{name}:-" not in text and f"${{{name}}}" not in text, name


@pytest.mark.parametrize("service", ["listener", "api", "worker", "worker-cpu"])
def test_compose_environment_is_valid_production_settings(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _interpolate_compose(_load_compose())
    env = {k: str(v) for k, v in compose["services"][service]["environment"].items()}
    settings = _settings_from_env(env, monkeypatch)
    assert settings.mode == "production"
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.database_url and settings.database_url.startswith(
        "postgresql+psycopg://rtcontour:placeholder@postgres:5432/"
    )


# ---------------------------------------------------------------- Dockerfiles


def _stages(text: str) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by build stage; [0] holds pre-FROM ARGs."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[str]] = [[]]
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_base_images_and_runs_rtcontour_as_non_root(path: Path) -> None:
    stages = _stages(path.read_text())
    args = dict(
        re.match(r"ARG (\w+)=(\S+)", line).groups()  # type: ignore[union-attr]
        for line in stages[0] if line.startswith("ARG ") and "=" in line
    )
    stage_names = set()
    for stage in stages[1:]:
        from_line = stage[0].split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], from_line[1])
        if len(from_line) >= 4 and from_line[2].upper() == "AS":
            stage_names.add(from_line[3])
        if image in stage_names:
            continue
        assert re.search(r":[\w.-]+$|@sha256:", image), f"{path.name}: {image} has no tag"
        assert not image.endswith(":latest"), f"{path.name}: {image} uses latest"
    final = stages[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{path.name}: runs as root"
    assert 'ENTRYPOINT ["rtcontour"]' in final, path.name


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_never_installs_torch_and_asserts_it_is_absent(path: Path) -> None:
    text = path.read_text()
    installs = re.findall(r"pip install[^\n&]*", re.sub(r"\\\n", " ", text))
    assert installs, path.name
    for command in installs:
        assert "torch" not in command and "train" not in command, f"{path.name}: {command}"
    assert 'python -c "import torch"' in text, f"{path.name} does not check torch is absent"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_existing_sources(path: Path) -> None:
    for line in _stages(path.read_text()):
        for instruction in line:
            if instruction.startswith("COPY ") and "--from=" not in instruction:
                for source in instruction.split()[1:-1]:
                    if "*" not in source:
                        assert (ROOT / source).exists(), f"{path.name} copies missing {source}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_imports_the_installed_names_and_finds_the_packaged_models(
    path: Path,
) -> None:
    # The folders install as rtcontour.*, and the model packages travel in the wheel: the
    # build checks both with -I, so /src (where `models/` lies) is never on sys.path.
    text = re.sub(r"\\\n", " ", path.read_text())
    bare = re.findall(r"import (?:common|models|worker|service)\b", text)
    assert not bare, f"{path.name} imports the folders by their bare names: {bare}"
    assert re.search(r'python -I -c "import rtcontour\.common, rtcontour\.service\.cli, '
                     r'rtcontour\.worker, rtcontour\.models', text), path.name
    assert re.search(r'python -I -c "from rtcontour\.models\.package import '
                     r'find_latest_package; +print\(find_latest_package\(\)\)"', text), path.name
    assert "cp -a models/packages" not in text, f"{path.name}: the wheel holds the packages"


def test_gpu_worker_installs_the_gpu_extra_on_a_cuda_base() -> None:
    text = (DOCKER / "Dockerfile.worker-gpu").read_text()
    assert 'pip install ".[gpu]"' in text
    assert re.search(r"nvidia/cuda:12\.[\w.-]+-cudnn-runtime-ubuntu", text)
    assert "pip uninstall -y onnxruntime" in text  # the CPU wheel would shadow the GPU one
    assert "CUDAExecutionProvider" in text
    assert 'CMD ["worker"]' in text


def test_service_image_exposes_dicom_and_api_and_checks_health() -> None:
    text = (DOCKER / "Dockerfile.service").read_text()
    assert re.search(r"^EXPOSE 11112 8000$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "healthcheck.py" in text
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.MULTILINE)
    assert "ARG PYTHON_IMAGE=python:3.11" in text
    assert re.search(r'pip install \.(\s|$)', text), "service image installs without extras"


def test_dockerignore_keeps_data_and_secrets_out_of_the_build_context() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "var", "*.pt", "*.dcm", "docker/.env"):
        assert pattern in patterns, pattern


# ---------------------------------------------------------------- health check script


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_server() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_healthcheck_passes_on_health_and_fails_on_closed_port(
    health_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthcheck = _load_healthcheck()
    monkeypatch.setenv("RTCONTOUR_API_PORT", str(health_server))
    assert healthcheck.main(["api"]) == 0
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("RTCONTOUR_DICOM_PORT", str(listening.getsockname()[1]))
        assert healthcheck.main(["dicom"]) == 0
    with socket.socket() as closed:  # bound but not listening: connection refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RTCONTOUR_API_PORT", str(closed.getsockname()[1]))
        monkeypatch.setenv("RTCONTOUR_DICOM_PORT", str(closed.getsockname()[1]))
        assert healthcheck.main(["api"]) == 1
        assert healthcheck.main(["dicom"]) == 1


def test_api_serves_the_health_route_the_probes_use(tmp_path: Path) -> None:
    app_module = pytest.importorskip("rtcontour.service.api.app",
                                     reason="rtcontour.service.api.app not written yet")
    app = app_module.create_app(Settings(data_dir=tmp_path))
    paths = {getattr(route, "path", None) for route in app.routes}
    assert "/health" in paths
