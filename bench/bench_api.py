"""API latency: preview rendering (cold and warm) and job/audit/metrics queries at scale.

    python -m bench.bench_api [--slices 120] [--jobs 10000] [--rounds 5]

A head phantom CT of ``--slices`` x 512 x 512 (0.98 mm pixels, 2.5 mm slices) gets a real
RTSTRUCT (Body and Marker); the API (in-process, SQLite in a temporary folder) renders its
previews, then ``--jobs`` job rows are inserted and the list, filter, stats, audit and
/metrics routes are timed. Medians of ``--rounds`` requests, in milliseconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from rtcontour.common.jobstore import Job
from rtcontour.common.volume import load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from tests.phantoms import head_phantom, write_ct_series
from tests.service.api_support import ApiHarness, make_harness

STATES = ["done", "failed", "queued", "running", "send_failed"]


def _timed(harness: ApiHarness, url: str, rounds: int) -> tuple[float, int]:
    times = []
    size = 0
    for _ in range(rounds):
        start = time.perf_counter()
        response = harness.client.get(url, headers=harness.headers("admin"))
        times.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
        size = len(response.content)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    harness = make_harness(Path(tempfile.mkdtemp(prefix="bench-api-")))
    spacing = (2.5, 0.98, 0.98)
    phantom = head_phantom((args.slices, 512, 512), spacing)
    job = harness.add_job(state="done")
    folder = harness.settings.spool_dir / "jobs" / job.id
    paths = write_ct_series(folder, phantom.hu, spacing, seed=1)
    series = load_series(paths, min_slices=1)
    masks = {
        "Marker": series.volume.array_from_canonical(phantom.marker),
        "Body": series.volume.array_from_canonical(phantom.body),
    }
    rois = [RoiSpec("Marker", (255, 0, 0)), RoiSpec("Body", (0, 255, 0))]
    dataset = build_rtstruct(series, masks, rois, model_name="bench", model_version="1")
    path = save_rtstruct(dataset, harness.settings.archive_dir / job.id / "RS.dcm")
    harness.store.set_spool_dir(job.id, str(folder), len(paths))
    harness.store.record_output(
        job.id, kind="RTSTRUCT", sop_instance_uid=str(dataset.SOPInstanceUID), path=str(path)
    )

    rows: list[tuple[str, float, str]] = []
    base = f"/api/jobs/{job.id}/preview.png"
    cold, _ = _timed(harness, f"{base}?plane=axial&index={args.slices // 2}", 1)
    rows.append((f"preview, cold (load {args.slices}x512x512 CT + RTSTRUCT)", cold, ""))
    for plane, index in (("axial", args.slices // 4), ("coronal", 256), ("sagittal", 256)):
        ms, size = _timed(harness, f"{base}?plane={plane}&index={index}", args.rounds)
        rows.append((f"preview {plane}, warm", ms, f"{size} B PNG"))

    now = dt.datetime.now(dt.UTC)
    jobs = [
        {
            "id": f"{i:032x}",
            "series_instance_uid": f"1.2.3.{i}",
            "study_instance_uid": "1.2",
            "calling_ae": f"TPS_{i % 5}",
            "modality": "CT",
            "series_description": "CT",
            "n_instances": 100,
            "state": STATES[i % 5],
            "model_name": "hn",
            "created_at": now - dt.timedelta(minutes=i),
            "updated_at": now,
            "finished_at": now - dt.timedelta(minutes=i) + dt.timedelta(seconds=60),
            "load_s": 1.0,
            "inference_s": 20.0 + i % 7,
            "contours_s": 1.0,
            "send_s": 0.5,
            "attempts": 1,
            "generation": 0,
            "sent_destinations": [],
        }
        for i in range(args.jobs)
    ]
    with harness.engine.begin() as connection:
        connection.execute(insert(Job), jobs)
    for url in (
        "/api/jobs?limit=50",
        "/api/jobs?limit=50&state=failed&calling_ae=TPS_1",
        f"/api/jobs?limit=50&offset={args.jobs - 1000}",
        "/api/stats?hours=24&bucket_minutes=60",
        "/api/audit?limit=100",
        "/metrics",
    ):
        ms, _ = _timed(harness, url, args.rounds)
        rows.append((f"GET {url} ({args.jobs + 1} jobs)", ms, ""))

    width = max(len(name) for name, _, _ in rows)
    print(f"{'what':<{width}}  {'ms':>8}  note")
    for name, ms, note in rows:
        print(f"{name:<{width}}  {ms:8.1f}  {note}")
    harness.engine.dispose()


if __name__ == "__main__":
    main()
