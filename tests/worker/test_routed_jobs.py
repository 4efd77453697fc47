"""Jobs run as their route said: the route's model (several resident in one worker) and the
route's destinations instead of RTCONTOUR_DESTINATIONS."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.errors import ConfigurationError, ModelPackageError
from rtcontour.common.jobstore import JobStore
from rtcontour.common.routes import parse_routing
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Destination, Settings
from rtcontour.models.registry import check_routes_models, resolve_package_path
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime, execute_job
from tests.conftest import StoreScp, ThresholdModel, build_test_package, write_phantom_series


def _job(store: JobStore, settings: Settings, tmp_path: Path, **route: object) -> str:
    """A queued job of a phantom series, with the route fields ``route`` gives."""
    job = store.create_or_merge_for_series(series_instance_uid=f"1.2.3.{len(store.list())}",
                                           **route).job  # type: ignore[arg-type]
    folder = settings.spool_dir / "jobs" / job.id
    write_phantom_series(folder, (12, 32, 32), seed=len(store.list()))
    store.set_spool_dir(job.id, str(folder), 12)
    store.mark_queued(job.id)
    return job.id


def test_each_job_uses_its_routes_model_and_destinations(
    settings: Settings, tmp_path: Path, tps: StoreScp
) -> None:
    other = StoreScp(tmp_path / "aria", "ARIA").start()
    try:
        unused = StoreScp(tmp_path / "unused", "UNUSED").start()  # RTCONTOUR_DESTINATIONS
        settings = settings.model_copy(
            update={"destinations": [Destination.parse(unused.destination)]})
        models = {"hn-a": ThresholdModel(), "hn-b": ThresholdModel()}
        for name, model in models.items():
            model.name = name
        loads: list[Path] = []

        def loader(path: Path, overlap: float, mirror: bool) -> ThresholdModel:
            loads.append(path)
            return models[path.name]

        engine = make_engine(settings)
        create_schema(engine)
        store = JobStore(engine)
        runtime = WorkerRuntime(
            settings, store=store,
            model_cache=SegmenterCache(loader=loader, resolver=lambda _s, r: Path(r or "hn-a")),
            sender=Sender(settings, sleep=lambda _: None),
        )
        first = _job(store, settings, tmp_path, route_name="a", model_request="hn-a",
                     destinations=[tps.destination])
        second = _job(store, settings, tmp_path, route_name="b", model_request="hn-b",
                      destinations=[tps.destination, other.destination])
        third = _job(store, settings, tmp_path, route_name="a", model_request="hn-a",
                     destinations=[other.destination])
        for job_id in (first, second, third):
            assert execute_job(job_id, runtime).state == "done"
        assert [store.get(j).model_name for j in (first, second, third)] == [
            "hn-a", "hn-b", "hn-a"]
        assert [p.name for p in loads] == ["hn-a", "hn-b"]  # each loaded once, both resident
        assert len(runtime.model_cache.resident()) == 2
        deadline = time.monotonic() + 10
        while (len(tps.received()) < 2 or len(other.received()) < 2) and (
                time.monotonic() < deadline):
            time.sleep(0.1)
        assert len(tps.received()) == 2 and len(other.received()) == 2
        assert unused.received() == []  # the routes' destinations replace it
    finally:
        other.stop()
        unused.stop()


def test_model_requests_resolve_by_name_newest_or_exact_version(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the 'train' extra (torch) builds test packages")
    root = tmp_path / "packages"
    old = build_test_package(root, name="hn", version="1.2.0")
    new = build_test_package(root, name="hn", version="1.10.0")
    settings = Settings(data_dir=tmp_path / "var", model_packages_dir=root)
    assert resolve_package_path(settings, "hn") == new
    assert resolve_package_path(settings, "hn-1.2.0") == old
    assert resolve_package_path(settings, None) == new
    with pytest.raises(ModelPackageError, match="'lung' is not installed .* hn-1.10.0, hn-1.2.0"):
        resolve_package_path(settings, "lung")
    table = parse_routing({"routes": [{"name": "hn", "model": "hn-1.2.0"},
                                      {"name": "lung", "model": "lung"}]})
    with pytest.raises(ConfigurationError, match="route 'lung', field model: model package"):
        check_routes_models(settings, table)
