"""The Celery app and task configuration: late acks, one at a time, time limits, names."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rtcontour.common.queue import RUN_JOB_TASK, celery_config, enqueue_job
from rtcontour.common.settings import Settings
from rtcontour.worker.celery_app import make_celery


@pytest.mark.parametrize(
    "broker_url", [None, "redis://127.0.0.1:6379/0"], ids=["embedded", "redis"]
)
def test_task_is_late_acked_requeued_on_worker_loss_and_time_limited(
    settings: Settings, broker_url: str | None
) -> None:
    settings = settings.model_copy(update={"broker_url": broker_url, "job_time_limit_s": 600})
    app = make_celery(settings)
    task = app.tasks[RUN_JOB_TASK]
    assert task.name == "rtcontour.run_job"
    assert task.acks_late and task.reject_on_worker_lost and task.ignore_result
    assert task.time_limit == 600 and 0 < task.soft_time_limit < 600
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost


def test_redis_visibility_timeout_outlasts_the_job_time_limit(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:6379/0", "job_time_limit_s": 1800}
    )
    options = celery_config(settings)["broker_transport_options"]
    assert options["visibility_timeout"] > 1800


def test_embedded_broker_keeps_messages_in_data_dir(settings: Settings) -> None:
    config = celery_config(settings)
    assert config["broker_url"].startswith("rtcfs://")
    assert config["worker_enable_remote_control"] is False
    enqueue_job(settings, "0123456789abcdef0123456789abcdef")
    queue = Path(settings.data_dir) / "broker" / "queue"
    (message,) = [p for p in queue.iterdir() if not p.name.startswith(".")]
    assert message.name.endswith(".rtcontour.msg")
    assert "0123456789abcdef0123456789abcdef" in message.read_text()


@pytest.mark.parametrize("broker", ["embedded", "redis"], ids=["embedded", "redis"])
def test_queue_depth_counts_waiting_messages(
    settings: Settings, broker: str, request: pytest.FixtureRequest
) -> None:
    from rtcontour.common.queue import QUEUE, make_enqueue, make_queue_depth

    if broker == "redis":
        settings = settings.model_copy(
            update={"broker_url": request.getfixturevalue("redis_db_url")}
        )
    app = make_celery(settings)
    depth = make_queue_depth(app, QUEUE)
    assert depth() in (0, None) if broker == "redis" else depth() == 0
    enqueue = make_enqueue(app)
    enqueue("a" * 32)
    enqueue("b" * 32)
    assert depth() == 2


def test_recovery_skips_waiting_jobs_while_the_broker_holds_their_messages(
    settings: Settings,
) -> None:
    from rtcontour.common.db import make_engine
    from rtcontour.common.jobstore import JobStore
    from rtcontour.common.schema import create_schema
    from rtcontour.worker.tasks import recover_jobs

    engine = make_engine(settings)
    create_schema(engine)
    store = JobStore(engine)
    waiting = [
        store.create_or_merge_for_series(series_instance_uid=f"1.2.{i}").job.id for i in range(2)
    ]
    for job_id in waiting:
        store.mark_queued(job_id)
    orphan = store.create_or_merge_for_series(series_instance_uid="1.2.9").job.id
    store.claim(orphan, "dead-worker", lease_s=0.0)
    enqueued: list[str] = []
    assert recover_jobs(store, enqueued.append, 0, waiting_messages=2) == 1
    assert enqueued == [orphan]
    enqueued.clear()
    assert recover_jobs(store, enqueued.append, 0, waiting_messages=1) == 3
    assert enqueued == [*waiting, orphan]


def test_recovery_gives_a_job_whose_intake_stopped_half_way_time_to_finish(
    settings: Settings,
) -> None:
    """A job still "received" lost its listener mid-intake; the restarted listener's journal
    finishes the intake, so the sweep does not run it with a part of its files meanwhile."""
    from rtcontour.common.db import make_engine
    from rtcontour.common.jobstore import JobStore
    from rtcontour.common.schema import create_schema
    from rtcontour.worker.tasks import recover_jobs

    engine = make_engine(settings)
    create_schema(engine)
    store = JobStore(engine)
    received = store.create_or_merge_for_series(series_instance_uid="1.2.7").job.id
    queued = store.create_or_merge_for_series(series_instance_uid="1.2.8").job.id
    store.mark_queued(queued)
    enqueued: list[str] = []
    assert recover_jobs(store, enqueued.append, 0, received_older_than_s=600) == 1
    assert enqueued == [queued]
    enqueued.clear()
    assert recover_jobs(store, enqueued.append, 0, received_older_than_s=0) == 2
    assert enqueued == [received, queued]


def test_recovery_sweeper_waits_past_the_quiet_period_before_running_a_received_job(
    settings: Settings,
) -> None:
    from rtcontour.common.db import make_engine
    from rtcontour.common.jobstore import JobStore
    from rtcontour.common.schema import create_schema
    from rtcontour.worker.tasks import RecoverySweeper

    settings = settings.model_copy(update={"recovery_interval_s": 0.1, "quiet_period_s": 1.0})
    engine = make_engine(settings)
    create_schema(engine)
    store = JobStore(engine)
    received = store.create_or_merge_for_series(series_instance_uid="1.2.7").job.id
    queued = store.create_or_merge_for_series(series_instance_uid="1.2.8").job.id
    store.mark_queued(queued)
    enqueued: list[str] = []
    sweeper = RecoverySweeper(settings, store, enqueued.append).start()
    try:
        deadline = time.monotonic() + 10
        while queued not in enqueued and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # five more sweeps
    finally:
        sweeper.stop()
    assert queued in enqueued and received not in enqueued


def test_worker_reads_the_structure_name_mapping_once_and_again_when_it_changes(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from rtcontour.common import structure_names
    from rtcontour.worker.tasks import WorkerRuntime

    path = tmp_path / "names.yaml"
    path.write_text("Tronc: Brainstem\n", encoding="utf-8")
    reads: list[object] = []
    real = structure_names.load_name_mapping
    monkeypatch.setattr(structure_names, "load_name_mapping",
                        lambda source: reads.append(source) or real(source))
    runtime = WorkerRuntime(settings.model_copy(update={"structure_names_file": path}))
    assert runtime.structure_names() == {"Tronc": "Brainstem"}
    assert runtime.structure_names() == {"Tronc": "Brainstem"}  # the next dose job
    assert len(reads) == 1
    path.write_text("Tronc: Brainstem\nMoelle: SpinalCord\n", encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert runtime.structure_names() == {"Tronc": "Brainstem", "Moelle": "SpinalCord"}
    assert len(reads) == 2
    assert WorkerRuntime(settings).structure_names() is None
