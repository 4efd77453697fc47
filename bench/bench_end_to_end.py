"""CT pushed to RTSTRUCT at the TPS, as the TPS sees it: DCMTK ``storescu`` -> ``rtcontour
serve`` (embedded defaults: SQLite, embedded broker, one worker) -> DCMTK ``storescp`` as the
TPS. A benchmark (``python -m bench.bench_end_to_end``), never run by the test suite.

    python -m bench.bench_end_to_end [--runs 4] [--slices 128] [--settle-s 20]
                                     [--env RTCONTOUR_INFERENCE_OVERLAP=0.25 ...]
                                     [--label NAME] [--json-out FILE]

Each run sends a new series (an OpenKBP validation CT resampled to 512 x 512 x ``--slices``
at 0.98 x 0.98 x 2.5 mm, written once per run with its own UIDs; a synthetic head phantom
without the data) in one association; the clock starts when ``storescu`` returns (its
A-RELEASE answered) and stops when the TPS holds a readable RTSTRUCT. ``rtcontour serve``
starts once and gets ``--settle-s`` seconds after its worker is ready (a service runs before
its first CT arrives), so run 1 is the first job of a worker. The stage table comes from each
job's ``GET /api/jobs/{id}`` timings (``common.timings``); the header names the CPU, its
AVX-512 BF16 / AVX2 flags and the load average (another process busy on the cores slows
everything: compare before/after under the same conditions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.phantoms import head_phantom, write_ct_series

SPACING_MM = (2.5, 0.977, 0.977)  # slice, row, column
TOKEN = "development-admin-token"


def cpu_description() -> str:
    """CPU model, cores and the flags that decide the inference path (bf16 or not)."""
    text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    model = re.search(r"model name\s*:\s*(.*)", text)
    found = re.search(r"flags\s*:\s*(.*)", text)
    flags = set(found.group(1).split()) if found else set()
    wanted = ["avx512_bf16", "amx_bf16", "avx512f", "avx2"]
    shown = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)
    return (f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores "
            f"({shown})")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def busy_processes() -> list[str]:
    """Other processes using the CPU now (name, nice, %CPU), to say under which load we ran."""
    done = subprocess.run(["ps", "-eo", "pid,ni,pcpu,args", "--sort=-pcpu"], capture_output=True,
                          text=True, check=False)
    lines = []
    for line in done.stdout.splitlines()[1:6]:
        pid, nice, cpu, *args = line.split(None, 3)
        if float(cpu) >= 20 and int(pid) != os.getpid():
            lines.append(f"pid {pid} nice {nice} {cpu}% CPU: {' '.join(args)[:90]}")
    return lines


def make_ct(n_slices: int) -> np.ndarray:
    """A canonical HU volume (slices, 512, 512): an OpenKBP validation CT, else a phantom."""
    from rtcontour.models.resampling import resample_to_shape

    try:
        from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw

        hu, _, _, spacing = load_openkbp_raw(list_cases(default_data_dir(), "validation")[0])
        source = "OpenKBP validation patient (first of the split)"
    except (FileNotFoundError, IndexError, ImportError):
        phantom = head_phantom()
        hu, spacing = phantom.hu, phantom.spacing_mm
        source = "synthetic head phantom (no OpenKBP data)"
    shape = (n_slices, 512, 512)
    scale = [t / s for t, s in zip(SPACING_MM, spacing, strict=True)]
    print(f"CT: {source}, resampled to {shape[2]}x{shape[1]}x{shape[0]} at "
          f"{SPACING_MM[1]} x {SPACING_MM[2]} x {SPACING_MM[0]} mm")
    return resample_to_shape(hu.astype(np.float32), scale, shape, order=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:.0f} s")


def wait_for_line(log: Path, pattern: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace")):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{pattern!r} not in {log} after {timeout_s:.0f} s")


def api_get(port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback
        return json.load(reply)


def rtstructs(folder: Path) -> set[Path]:
    found = set()
    for path in folder.iterdir():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: S112 - still being written: looked at again next poll
            continue
        if ds.get("Modality") == "RTSTRUCT":
            found.add(path)
    return found


def one_run(series: Path, series_uid: str, ports: dict[str, int], tps_dir: Path,
            seen: set[Path], timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(["storescu", "-aet", "TPS", "-aec", "RTCONTOUR", "127.0.0.1",
                           str(ports["dicom"]), "+sd", str(series)], capture_output=True,
                          text=True, check=False)
    released = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
    while True:
        new = rtstructs(tps_dir) - seen
        if new:
            at_tps = time.monotonic()
            seen |= new
            break
        if time.monotonic() - released > timeout_s:
            raise RuntimeError(f"no RTSTRUCT at the TPS {timeout_s:.0f} s after the release")
        time.sleep(0.02)
    job: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the job ends just after the TPS's acknowledgement
        jobs = api_get(ports["api"], "/api/jobs?limit=5")["items"]
        match = [j for j in jobs if j["series_instance_uid"] == series_uid]
        if match and match[0]["state"] in ("done", "failed", "send_failed"):
            job = api_get(ports["api"], f"/api/jobs/{match[0]['id']}")
            break
        time.sleep(0.1)
    return {"send_s": released - started, "end_to_end_s": at_tps - released,
            "state": job.get("state"), "timings": job.get("timings", {})}


def print_table(results: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for result in results:
        keys += [key for key in result["timings"] if key not in keys]
    header = f"{'stage (s)':<18}" + "".join(f"{'run ' + str(i + 1):>9}"
                                          for i in range(len(results)))
    header += f"{'median':>9}{'median 2..':>11}"
    print(header)
    print("-" * len(header))

    def row(name: str, values: list[float | None]) -> None:
        cells = "".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in values)
        known = [v for v in values if v is not None]
        warm = [v for v in values[1:] if v is not None]
        median = f"{statistics.median(known):.2f}" if known else "-"
        median_warm = f"{statistics.median(warm):.2f}" if warm else "-"
        print(f"{name:<18}{cells}{median:>9}{median_warm:>11}")

    for key in keys:
        row(key.removesuffix("_s"), [r["timings"].get(key) for r in results])
    print("-" * len(header))
    row("storescu (send)", [r["send_s"] for r in results])
    row("release->RS @TPS", [r["end_to_end_s"] for r in results])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_end_to_end",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="series sent, one after another")
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--settle-s", type=float, default=20.0,
                        help="wait after the worker is ready before the first series")
    parser.add_argument("--gap-s", type=float, default=2.0, help="pause between runs")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for rtcontour serve (e.g. a setting)")
    parser.add_argument("--serve-pythonpath", default="",
                        help="PYTHONPATH for rtcontour serve only (e.g. an older checkout's "
                        "code, for a before/after comparison)")
    parser.add_argument("--label", default="", help="name printed with the results")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed: apt-get install dcmtk")

    print(f"CPU: {cpu_description()}")
    print(f"before: {load_average()}")
    for line in busy_processes():
        print(f"  busy: {line}")
    work = Path(tempfile.mkdtemp(prefix="rtc-e2e-"))
    hu = make_ct(args.slices)
    series_uids = []
    for run in range(args.runs):
        uid = generate_uid()
        write_ct_series(work / f"ct{run}", hu, SPACING_MM, series_uid=uid, seed=run,
                        series_description="CT 2.5mm")
        series_uids.append(uid)
    ports = {"dicom": free_port(), "api": free_port(), "tps": free_port()}
    tps_dir = work / "tps"
    tps_dir.mkdir()
    tps = subprocess.Popen(["storescp", "-aet", "TPS", "-od", str(tps_dir), str(ports["tps"])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    env = {**os.environ, "RTCONTOUR_DATA_DIR": str(work / "var"),
           "RTCONTOUR_DICOM_PORT": str(ports["dicom"]), "RTCONTOUR_API_PORT": str(ports["api"]),
           "RTCONTOUR_DESTINATIONS": f"TPS@127.0.0.1:{ports['tps']}"}
    if args.serve_pythonpath:
        env["PYTHONPATH"] = args.serve_pythonpath
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    log = work / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "rtcontour.service.cli", "serve"],
                                 env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    results = []
    try:
        wait_for_port(ports["tps"], 10, tps)
        wait_for_port(ports["dicom"], 120, serve)
        wait_for_port(ports["api"], 120, serve)
        wait_for_line(log, r"ready\.", 180)  # Celery's worker
        time.sleep(args.settle_s)
        seen: set[Path] = set()
        for run, uid in enumerate(series_uids):
            result = one_run(work / f"ct{run}", uid, ports, tps_dir, seen, args.timeout_s)
            print(f"run {run + 1}: release -> RTSTRUCT at the TPS {result['end_to_end_s']:.2f} s "
                  f"(job {result['state']})", flush=True)
            results.append(result)
            time.sleep(args.gap_s)
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
        tps.terminate()
        tps.wait(10)
    print()
    print(f"{args.label or 'results'}: {args.runs} runs of a {args.slices}x512x512 CT, "
          f"rtcontour serve with {' '.join(args.env) or 'its defaults'}")
    print(f"after: {load_average()}")
    print_table(results)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"label": args.label, "cpu": cpu_description(),
                                             "env": args.env, "runs": results}, indent=1))
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
