"""Top-level fixtures: settings in a temporary data dir, real PostgreSQL and Redis (skipped
with a message when unreachable), and ``rtcontour serve`` as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from rtcontour.common.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "RTCONTOUR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("RTCONTOUR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_reachable() -> str | None:
    try:
        import psycopg

        dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: skip with its message
        return f"PostgreSQL at {POSTGRES_URL} unreachable ({type(exc).__name__}: {exc})"


def _redis_reachable() -> str | None:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"Redis at {REDIS_URL} unreachable ({type(exc).__name__}: {exc})"


@pytest.fixture(scope="session")
def postgres_base_url() -> str:
    problem = _postgres_reachable()
    if problem:
        pytest.skip(problem)
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A database URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    schema = f"rtc_test_{uuid.uuid4().hex[:12]}"
    dsn = postgres_base_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{postgres_base_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="session")
def redis_url() -> str:
    problem = _redis_reachable()
    if problem:
        pytest.skip(problem)
    return REDIS_URL


@pytest.fixture
def redis_db_url(redis_url: str) -> Iterator[str]:
    """A Redis URL on a database index of its own (flushed before and after)."""
    import redis

    index = 1 + uuid.uuid4().int % 14
    url = redis_url.rsplit("/", 1)[0] + f"/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None (the embedded SQLite in data_dir) or a PostgreSQL URL on a fresh schema."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings in a temporary data dir with fast retries, for in-process tests."""
    return Settings(
        data_dir=tmp_path / "var",
        quiet_period_s=1.0,
        send_attempts=3,
        send_backoff_s=0.2,
        dicom_port=free_port(),
        api_port=free_port(),
    )


class ServeProcess:
    """``rtcontour serve`` running as a subprocess in its own process group."""

    def __init__(
        self, env: dict[str, str], log_path: Path, command: list[str] | None = None
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.command = command or [sys.executable, "-m", "rtcontour.service.cli", "serve"]
        self.dicom_port = int(env["RTCONTOUR_DICOM_PORT"])
        self.api_port = int(env["RTCONTOUR_API_PORT"])
        self.data_dir = Path(env["RTCONTOUR_DATA_DIR"])
        self.token = env["RTCONTOUR_ADMIN_TOKEN"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, timeout_s: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.command, *args],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rtcontour serve exited early:\n{self.log()}")
            try:
                response = httpx.get(f"{self.api_url}/health", timeout=1.0)
                if response.status_code == 200 and c_echo(self.dicom_port):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"rtcontour serve not ready after {timeout_s} s:\n{self.log()}")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def kill(self) -> None:
        """SIGKILL serve and every process it started at once, as a power cut would."""
        if self.process is None:
            return
        with _suppress_lookup():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM serve (it stops its children), then SIGKILL whatever is left in its
        process group (no stray worker survives to take the next test's messages)."""
        if self.process is None:
            return None
        pgid = self.process.pid
        code: int | None = None
        if self.process.poll() is None:
            with _suppress_lookup():
                os.kill(pgid, signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                code = None
        else:
            code = self.process.returncode
        with _suppress_lookup():
            os.killpg(pgid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(5)
        self.process = None
        return code


class _suppress_lookup:  # noqa: N801 - used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ProcessLookupError | PermissionError)


def c_echo(port: int, called_ae: str = "RTCONTOUR") -> bool:
    """True if a C-ECHO to 127.0.0.1:port succeeds (a real association, not a bare connect,
    which would leave the listener waiting for an A-ASSOCIATE-RQ)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="TPS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(getattr(status, "Status", -1)) == 0
    finally:
        assoc.release()


def _port_open(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def serve_env(
    data_dir: Path,
    *,
    destinations: str = "",
    broker_url: str | None = None,
    database_url: str | None = None,
    model_package: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a test ``rtcontour serve``: free ports, fast timings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")}
    env.update(
        RTCONTOUR_DATA_DIR=str(data_dir),
        RTCONTOUR_DICOM_PORT=str(free_port()),
        RTCONTOUR_DICOM_HOST="127.0.0.1",
        RTCONTOUR_API_PORT=str(free_port()),
        RTCONTOUR_ADMIN_TOKEN=f"test-token-{uuid.uuid4().hex}",
        RTCONTOUR_QUIET_PERIOD_S="1",
        RTCONTOUR_SEND_ATTEMPTS="3",
        RTCONTOUR_SEND_BACKOFF_S="0.5",
        RTCONTOUR_JOB_LEASE_S="6",
        RTCONTOUR_RECOVERY_INTERVAL_S="2",
        RTCONTOUR_MIN_SLICES="5",
        RTCONTOUR_MIN_FREE_DISK_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    if destinations:
        env["RTCONTOUR_DESTINATIONS"] = destinations
    if broker_url:
        env["RTCONTOUR_BROKER_URL"] = broker_url
    if database_url:
        env["RTCONTOUR_DATABASE_URL"] = database_url
    if model_package is not None:
        env["RTCONTOUR_MODEL_PACKAGE"] = str(model_package)
    env.update(extra or {})
    return env


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[object]:
    """Build and start ``rtcontour serve`` subprocesses; all stopped at teardown."""
    started: list[ServeProcess] = []

    def factory(
        env: dict[str, str], *args: str, timeout_s: float = 60.0,
        command: list[str] | None = None,
    ) -> ServeProcess:
        serve = ServeProcess(env, tmp_path / f"serve-{len(started)}.log", command)
        started.append(serve)
        serve.start(*args, timeout_s=timeout_s)
        return serve

    yield factory
    for serve in started:
        serve.stop()


# -- DCMTK storescp as the TPS ---------------------------------------------------------------
class StoreScp:
    """DCMTK ``storescp`` on a loopback port, writing what it receives to ``out_dir``."""

    def __init__(self, out_dir: Path, ae_title: str = "TPS", port: int | None = None) -> None:
        self.out_dir = out_dir
        self.ae_title = ae_title
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> StoreScp:
        self.process = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.out_dir), "+B", "-dhl",
             str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _port_open(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"storescp did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


@pytest.fixture
def tps(tmp_path: Path) -> Iterator[StoreScp]:
    """A running storescp (AE ``TPS``) standing in for the treatment planning system."""
    import shutil

    if shutil.which("storescp") is None:
        pytest.skip("DCMTK storescp is not installed (apt-get install dcmtk)")
    peer = StoreScp(tmp_path / "tps").start()
    yield peer
    peer.stop()


# -- CT series and a model that needs no weights ----------------------------------------------
def write_phantom_series(
    out_dir: Path,
    shape: tuple[int, int, int] = (24, 64, 64),
    *,
    patient_id: str = "RTC-PHANTOM-001",
    series_uid: str | None = None,
    study_uid: str | None = None,
    seed: int = 0,
    series_description: str | None = None,
) -> list[Path]:
    """A head phantom CT series (tests/phantoms.py) as files in ``out_dir``."""
    from tests.phantoms import head_phantom, write_ct_series

    phantom = head_phantom(shape)
    return write_ct_series(
        out_dir,
        phantom.hu,
        phantom.spacing_mm,
        patient_id=patient_id,
        series_uid=series_uid,
        study_uid=study_uid,
        seed=seed,
        **({"series_description": series_description} if series_description else {}),
    )


class ThresholdModel:
    """A stand-in ``SegmentationModel``: "Bone" is HU > 500, "Marker" HU > 1200.

    ``delay_s`` makes predict slow (to kill a worker in the middle of inference).
    """

    name = "threshold-test"
    version = "0.0.1"

    def __init__(self, delay_s: float = 0.0) -> None:
        from rtcontour.worker.rtstruct import RoiSpec

        self.rois = [RoiSpec("Bone", (255, 255, 0)), RoiSpec("Marker", (255, 0, 0))]
        self.delay_s = delay_s
        self.calls = 0

    def predict(self, hu, spacing_mm):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return {"Bone": hu > 500, "Marker": hu > 1200}


# -- a tiny, randomly initialised model package (the model engineer's export code) ----------
def build_test_package(
    out_root: Path,
    *,
    name: str = "tiny-test",
    version: str = "0.0.1",
    patch_size: tuple[int, int, int] = (16, 32, 32),
    base_channels: int = 4,
    seed: int = 0,
) -> Path:
    """Export a 2-level residual U-Net with random weights as a package under ``out_root``.

    Its masks mean nothing; it exercises the real package loading and ONNX inference path.
    """
    import torch

    from rtcontour.models.export import build_manifest, export_onnx
    from rtcontour.models.package import MANIFEST_NAME, WEIGHTS_NAME, load_package, sha256_file
    from rtcontour.models.train import TrainConfig, build_model

    torch.manual_seed(seed)
    config = TrainConfig(
        run="test", base_channels=base_channels, levels=2, max_channels=base_channels * 2,
        patch_size=patch_size, command=["pytest"],
    )
    model = build_model(config)
    folder = out_root / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model, patch_size, folder / WEIGHTS_NAME)
    manifest = build_manifest(
        config, name, version, sha256_file(folder / WEIGHTS_NAME), {}, 0, 0, "pytest",
        model.divisor,
    )
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text("Random weights, for tests only.\n")
    load_package(folder)
    return folder


@pytest.fixture(scope="session")
def test_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model package (fast inference) for pipeline tests."""
    pytest.importorskip("torch", reason="the 'train' extra (torch) exports the test package")
    return build_test_package(tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="session")
def tiny_dose_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dose package trained for two steps on synthetic cases (fast; its doses mean nothing)."""
    pytest.importorskip("torch", reason="torch is not installed (extra 'train')")
    from rtcontour.models.dose.export import write_package
    from rtcontour.models.dose.train import train
    from tests.models.test_dose_training import synthetic_cases, tiny_config

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-dose"
    train(tiny_config(steps=2, val_cases=0), synthetic_cases(), [], run_dir)
    return write_package(run_dir / "last.pt", tmp_path_factory.mktemp("dose-packages"),
                         "tiny-dose", "0.0.1", "pytest")


def real_package() -> Path | None:
    """The newest committed model package in models/packages, if any."""
    from rtcontour.models.package import find_latest_package

    try:
        return find_latest_package()
    except Exception:  # noqa: BLE001 - none committed yet
        return None


# -- end-to-end helpers -------------------------------------------------------------------------
def storescu(
    port: int, files: list[Path], *, calling_ae: str = "TPS", called_ae: str = "RTCONTOUR"
) -> None:
    """Send ``files`` in one association with DCMTK storescu (raises if it fails)."""
    import shutil

    if shutil.which("storescu") is None:
        pytest.skip("DCMTK storescu is not installed (apt-get install dcmtk)")
    result = subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")


def api_jobs(serve: ServeProcess, **params: object) -> list[dict]:
    import httpx

    response = httpx.get(
        f"{serve.api_url}/api/jobs", params={"limit": 500, **params}, headers=serve.headers(),
        timeout=10,
    )
    response.raise_for_status()
    return list(response.json()["items"])


def api_job(serve: ServeProcess, job_id: str) -> dict:
    import httpx

    response = httpx.get(f"{serve.api_url}/api/jobs/{job_id}", headers=serve.headers(), timeout=10)
    response.raise_for_status()
    return dict(response.json())


FINAL_STATES = {"done", "failed", "send_failed"}


def wait_for_jobs(
    serve: ServeProcess,
    count: int,
    *,
    states: set[str] = FINAL_STATES,
    timeout_s: float = 120.0,
) -> list[dict]:
    """Poll the API until ``count`` jobs exist and all are in ``states``; return them."""
    deadline = time.monotonic() + timeout_s
    jobs: list[dict] = []
    while time.monotonic() < deadline:
        jobs = api_jobs(serve)
        if len(jobs) >= count and all(job["state"] in states for job in jobs):
            return jobs
        time.sleep(0.25)
    raise AssertionError(
        f"after {timeout_s} s: {[(j['id'], j['state']) for j in jobs]} (want {count} in "
        f"{sorted(states)})\n--- serve log ---\n{serve.log()}"
    )


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def referenced_ct_uids(rtstruct_path: Path) -> set[str]:
    """SOP Instance UIDs of the CT images an RTSTRUCT's frame of reference lists."""
    import pydicom

    ds = pydicom.dcmread(rtstruct_path)
    return {
        image.ReferencedSOPInstanceUID
        for frame in ds.ReferencedFrameOfReferenceSequence
        for study in frame.RTReferencedStudySequence
        for series in study.RTReferencedSeriesSequence
        for image in series.ContourImageSequence
    }


def sop_uids(files: list[Path]) -> set[str]:
    import pydicom

    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


@pytest.fixture(scope="session")
def slow_test_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight package whose small patch makes inference take seconds at overlap 0.9
    (to act while a job is in the middle of inference)."""
    pytest.importorskip("torch", reason="the 'train' extra (torch) exports the test package")
    return build_test_package(
        tmp_path_factory.mktemp("slow-packages"), name="slow-test", patch_size=(4, 8, 8)
    )


SLOW_INFERENCE_ENV = {"RTCONTOUR_INFERENCE_OVERLAP": "0.9"}
