"""Ingest throughput: the same CT series sent by DCMTK storescu to DCMTK storescp and to
rtcontour's listener, alternately, for several rounds.

    python -m bench.bench_ingest --rounds 3

The series (128 slices of 512x512, 16-bit, Explicit VR Little Endian, ~64 MiB) is written
once with ``tests.phantoms``. Each measurement is the wall time of one ``storescu`` run (one
association, every instance answered) until it exits: by then every instance is on disk
(storescp writes into a fresh folder; the listener answers only after its atomic spool write).
Each receiver runs with its default maximum PDU (storescp 16 KiB unless ``--storescp-pdu``;
rtcontour ``max_pdu_bytes``, 128 KiB). Two network settings are measured, because they change
the picture: DCMTK as Debian ships it (Nagle's algorithm left on: storescu's small command PDU
waits for a delayed ACK, ~40 ms per instance with storescp), and ``TCP_NODELAY=1`` given to
storescu and storescp (how a tuned DCMTK sender behaves).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rtcontour.common.settings import Settings
from rtcontour.service.intake import SeriesArrival
from rtcontour.service.listener import start_listener
from tests.phantoms import write_ct_series


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port}")


def _send(files: list[Path], port: int, called_ae: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or "E:" in done.stderr:
        raise RuntimeError(f"storescu failed:\n{done.stderr[-2000:]}")
    return elapsed


def _to_storescp(files: list[Path], work: Path, env: dict[str, str]) -> float:
    out = Path(tempfile.mkdtemp(dir=work, prefix="storescp-"))
    port = _free_port()
    process = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        elapsed = _send(files, port, "STORESCP", env)
    finally:
        process.terminate()
        process.wait(10)
    received = sum(1 for p in out.iterdir() if p.is_file())
    if received != len(files):
        raise RuntimeError(f"storescp wrote {received} of {len(files)} files")
    shutil.rmtree(out)
    return elapsed


class _CountingSink:
    def __init__(self) -> None:
        self.arrivals: list[SeriesArrival] = []

    def series_complete(self, arrival: SeriesArrival) -> None:
        self.arrivals.append(arrival)


def _to_listener(files: list[Path], work: Path, env: dict[str, str]) -> float:
    data_dir = Path(tempfile.mkdtemp(dir=work, prefix="rtcontour-"))
    settings = Settings(
        data_dir=data_dir,
        dicom_host="127.0.0.1",
        dicom_port=_free_port(),
        quiet_period_s=0.2,
        min_free_disk_bytes=0,
    )
    sink = _CountingSink()
    handle = start_listener(settings, sink)
    try:
        elapsed = _send(files, handle.address[1], settings.ae_title, env)
        deadline = time.monotonic() + 10
        while not sink.arrivals and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        handle.shutdown(timeout_s=2)
    if not sink.arrivals or sink.arrivals[0].n_instances != len(files):
        raise RuntimeError(f"listener arrival wrong: {sink.arrivals}")
    shutil.rmtree(data_dir)
    return elapsed


def _run_mode(
    title: str, files: list[Path], megabytes: float, work: Path, env: dict[str, str], rounds: int
) -> float:
    receivers: dict[str, Callable[[list[Path], Path, dict[str, str]], float]] = {
        "storescp": _to_storescp,
        "rtcontour": _to_listener,
    }
    times: dict[str, list[float]] = {name: [] for name in receivers}
    print(f"\n== {title}")
    print(f"{'round':>5}  {'receiver':<10} {'seconds':>8} {'MB/s':>8}")
    for round_index in range(rounds):
        order = list(receivers) if round_index % 2 == 0 else list(reversed(receivers))
        for name in order:
            elapsed = receivers[name](files, work, env)
            times[name].append(elapsed)
            print(f"{round_index + 1:>5}  {name:<10} {elapsed:>8.2f} {megabytes / elapsed:>8.1f}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"median {name:<10} {median:>8.2f} {megabytes / median:>8.1f}")
    ratio = medians["storescp"] / medians["rtcontour"]
    print(f"rtcontour / storescp speed ratio: {ratio:.2f}x")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument(
        "--mode", choices=["both", "dcmtk-default", "tcp-nodelay"], default="both"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (Debian package dcmtk) is required")
    default_env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    modes = {
        "dcmtk-default": ("DCMTK defaults (Nagle on)", default_env),
        "tcp-nodelay": ("TCP_NODELAY=1 for storescu/storescp", {**default_env, "TCP_NODELAY": "1"}),
    }
    chosen = list(modes) if args.mode == "both" else [args.mode]

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        hu = rng.normal(0.0, 300.0, (args.slices, args.size, args.size)).astype(np.float32)
        files = write_ct_series(work / "series", hu, (2.0, 0.98, 0.98), seed=0)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances of {args.size}x{args.size}, {megabytes:.1f} MB; "
              f"rtcontour max PDU {Settings().max_pdu_bytes} B, storescp max PDU 16384 B")
        ratios = {m: _run_mode(modes[m][0], files, megabytes, work, modes[m][1], args.rounds)
                  for m in chosen}
        print("\nsummary: " + ", ".join(f"{m}: {r:.2f}x" for m, r in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
