"""Sliding-window inference: rtcontour (onnxruntime, OpenVINO) vs MONAI on PyTorch.

    python -m bench.bench_inference [--package models/packages/<name>-<version>]
                                    [--overlap 0.5] [--threads 2] [--rounds 2]
                                    [--postprocess-only]

The volume is an OpenKBP validation CT resampled to a 512x512x130 grid (0.98 x 0.98 mm,
2.5 mm slices) in canonical orientation. Every method runs the same network (the package's
ONNX for ours, the PyTorch module rebuilt from ``--checkpoint`` for MONAI; random weights if
no checkpoint: speed does not depend on them), on the same normalised model-grid volume, with
the same patch, overlap, Gaussian blending and window batch of 2. Each method runs in its own
process so the peak RSS (VmHWM) is its own. GFLOP/s counts the convolution multiply-adds of
all windows (2 FLOP per MAC) against the FP32 peak of the machine: cores x FP32 FMA lanes per
cycle x 2 x clock (lscpu / /proc/cpuinfo). Last, the whole ``Segmenter.predict`` path (HU on
the CT grid in, masks on the CT grid out) is timed for each backend. Needs monai (extra bench).

``--postprocess-only`` times just the return to the CT grid (model-grid probabilities of the
same CT -> seven masks, in one process): the former path (each structure's box of
``p >= 0.5`` resampled, then component filtering and hole filling over the full CT grid)
against ``Segmenter.segmentation_from_probabilities`` (per-structure boxes around the largest
component, post-processing in the box, confidence included), and checks that the masks agree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

CT_SHAPE = (130, 512, 512)
CT_SPACING = (2.5, 0.977, 0.977)


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def fp32_peak_gflops(threads: int) -> tuple[float, str]:
    """Theoretical FP32 peak of ``threads`` cores and how it was derived."""
    text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", text).group(1))  # type: ignore[union-attr]
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())  # type: ignore[union-attr]
    vendor = re.search(r"vendor_id\s*:\s*(\S+)", text)
    amd = bool(vendor and vendor.group(1) == "AuthenticAMD")
    if "avx512f" in flags and not amd:
        lanes, why = 32, "2 x 512-bit FMA units"
    elif "avx512f" in flags or "avx2" in flags:
        # Zen 4 executes AVX-512 on two 256-bit FMA pipes: 16 FP32 FMA per cycle
        lanes, why = 16, "2 x 256-bit FMA pipes"
    else:
        lanes, why = 4, "SSE"
    peak = threads * lanes * 2 * mhz / 1000.0
    return peak, f"{threads} cores x {lanes} FP32 FMA/cycle ({why}) x 2 x {mhz / 1000:.2f} GHz"


def make_ct() -> np.ndarray:
    """A 130x512x512 canonical HU volume from an OpenKBP validation patient (or a phantom)."""
    from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw
    from rtcontour.models.resampling import resample_to_shape

    try:
        hu, _, _, spacing = load_openkbp_raw(list_cases(default_data_dir(), "validation")[0])
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        hu = rng.normal(0, 50, (128, 128, 128)).astype(np.int16)
        spacing = (2.5, 4.0, 4.0)
    scale = [t / s for t, s in zip(CT_SPACING, spacing, strict=True)]
    return resample_to_shape(hu.astype(np.float32), scale, CT_SHAPE, order=1)


def conv_flops(model: Any, patch: tuple[int, int, int]) -> float:
    """FLOPs (2 per multiply-add) of the convolutions of one forward pass of one patch."""
    import torch

    total = [0.0]

    def hook(module: Any, inputs: Any, output: Any) -> None:
        kernel = float(np.prod(module.kernel_size))
        cin, cout = module.in_channels, module.out_channels
        if isinstance(module, torch.nn.ConvTranspose3d):
            voxels = float(np.prod(inputs[0].shape[2:]))
        else:
            voxels = float(np.prod(output.shape[2:]))
        total[0] += 2.0 * cin * cout * kernel * voxels / module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, *patch))
    for handle in handles:
        handle.remove()
    return total[0]


def _torch_model(checkpoint: str | None, patch: tuple[int, int, int]) -> Any:
    import torch

    from rtcontour.models.train import TrainConfig, build_model, load_checkpoint

    if checkpoint and Path(checkpoint).exists():
        payload = load_checkpoint(Path(checkpoint))
        model = build_model(TrainConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["model"])
    else:
        torch.manual_seed(0)
        model = build_model(TrainConfig(patch_size=patch))
    return model.eval()


def _worker(task: dict[str, Any], queue: Any) -> None:
    """Run one method in a fresh process and report times and peak RSS."""
    os.environ["OMP_NUM_THREADS"] = str(task["threads"])
    from rtcontour.models.inference import Segmenter
    from rtcontour.models.package import load_package

    package = load_package(task["package"])
    patch = tuple(package.manifest.patch_size)
    ct = make_ct()
    result: dict[str, Any] = {"method": task["method"]}
    times: list[float] = []
    if task["method"].startswith("e2e-"):
        segmenter = Segmenter(package, overlap=task["overlap"], provider=task["provider"],
                              threads=task["threads"],
                              openvino_precision=task.get("precision", "bf16"))
        for _ in range(task["rounds"]):
            started = time.perf_counter()
            masks = segmenter.predict(ct, CT_SPACING)
            times.append(time.perf_counter() - started)
        result["n_voxels"] = int(sum(m.sum() for m in masks.values()))
    else:
        image = Segmenter(package, provider="cpu", threads=1).preprocess(ct, CT_SPACING)
        del ct
        result["grid"] = list(image.shape)
        if task["method"] == "monai-pytorch":
            import torch
            from monai.inferers import sliding_window_inference

            torch.set_num_threads(task["threads"])
            model = _torch_model(task["checkpoint"], patch)  # type: ignore[arg-type]
            tensor = torch.from_numpy(image)[None, None]
            for _ in range(task["rounds"] + 1):
                started = time.perf_counter()
                with torch.no_grad():
                    logits = sliding_window_inference(
                        tensor, roi_size=patch, sw_batch_size=2, predictor=model,
                        overlap=task["overlap"], mode="gaussian", sigma_scale=0.125,
                        padding_mode="constant", cval=-1.0)
                    torch.sigmoid(logits)
                times.append(time.perf_counter() - started)
            times = times[1:]
        else:
            segmenter = Segmenter(package, overlap=task["overlap"], provider=task["provider"],
                                  threads=task["threads"],
                                  openvino_precision=task.get("precision", "bf16"))
            segmenter.predict_probabilities(image[:patch[0], :patch[1], :patch[2]])  # warm-up
            for _ in range(task["rounds"]):
                started = time.perf_counter()
                segmenter.predict_probabilities(image)
                times.append(time.perf_counter() - started)
            result["windows"] = len(list(segmenter._windows(
                [max(s, p) for s, p in zip(image.shape, patch, strict=True)])))
    result["seconds"] = statistics.median(times)
    result["peak_rss_mb"] = _peak_rss_mb()
    queue.put(json.dumps(result))


def _former_postprocess(segmenter: Any, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The return to the CT grid of rtcontour <= 1.2.0 (boxed resampling, full-grid
    post-processing), for comparison."""
    from rtcontour.models.inference import postprocess_mask

    return {label.roi_name: postprocess_mask(
        segmenter._probabilities_to_mask(probs[label.index], CT_SPACING, CT_SHAPE),
        label.single_component) for label in segmenter.manifest.labels}


def bench_postprocess(package_dir: Path, overlap: float, threads: int, rounds: int) -> None:
    """Time the former and the current return to the CT grid on one CT's probabilities."""
    from rtcontour.models.inference import Segmenter

    segmenter = Segmenter(package_dir, overlap=overlap, provider="openvino", threads=threads,
                          min_volume_cc={})
    ct = make_ct()
    started = time.perf_counter()
    probs = segmenter.predict_probabilities(segmenter.preprocess(ct, CT_SPACING))
    print(f"network on the model grid {probs.shape[1:]}: {time.perf_counter() - started:.1f} s "
          f"(once, {threads} threads)")
    del ct
    rows = []
    results: dict[str, dict[str, np.ndarray]] = {}
    for label, method in (
        ("former: boxed resampling, full-grid post-processing",
         lambda: _former_postprocess(segmenter, probs)),
        ("now: per-structure box, post-processing in the box",
         lambda: segmenter.segmentation_from_probabilities(probs, CT_SPACING, CT_SHAPE).masks),
    ):
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            results[label] = method()
            times.append(time.perf_counter() - started)
        rows.append((label, statistics.median(times)))
    former, now = results.values()
    differing = {name: int(np.count_nonzero(former[name] != now[name])) for name in former}
    print(f"\nCT grid {CT_SHAPE}: probabilities -> 7 masks (median of {rounds})")
    print(f"{'method':<56} {'s':>7}")
    for label, seconds in rows:
        print(f"{label:<56} {seconds:>7.2f}")
    print(f"voxels that differ per structure: {differing}")


def run_isolated(task: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(task, queue))
    process.start()
    output = queue.get()
    process.join()
    return json.loads(output)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    from rtcontour.models.package import find_latest_package, load_package

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--checkpoint", default="runs/hn-oar-1/best.pt",
                        help="PyTorch weights for the MONAI run (random if absent)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postprocess-only", action="store_true",
                        help="time only the return of the probabilities to the CT grid")
    args = parser.parse_args(argv)
    package_dir = args.package or find_latest_package()
    if args.postprocess_only:
        bench_postprocess(package_dir, args.overlap, args.threads, args.rounds)
        return 0
    package = load_package(package_dir)
    patch = tuple(package.manifest.patch_size)
    base = {"package": str(package_dir), "overlap": args.overlap, "threads": args.threads,
            "rounds": args.rounds, "checkpoint": args.checkpoint}
    methods = [
        ("rtcontour onnxruntime", {"method": "ours-ort", "provider": "cpu"}),
        ("rtcontour OpenVINO f32", {"method": "ours-openvino", "provider": "openvino",
                                    "precision": "f32"}),
        ("rtcontour OpenVINO bf16", {"method": "ours-openvino", "provider": "openvino",
                                     "precision": "bf16"}),
        ("MONAI sliding_window_inference (PyTorch fp32)", {"method": "monai-pytorch"}),
    ]
    flops_window = conv_flops(_torch_model(args.checkpoint, patch), patch)  # type: ignore[arg-type]
    peak, peak_note = fp32_peak_gflops(args.threads)
    print(f"package {package_dir.name}; patch {patch}; overlap {args.overlap}; "
          f"{args.threads} threads; CT {CT_SHAPE} at {CT_SPACING} mm")
    print(f"FP32 peak {peak:.0f} GFLOP/s = {peak_note}; "
          f"{flops_window / 1e9:.2f} GFLOP per window")
    rows = []
    windows = 0
    for label, extra in methods:
        result = run_isolated({**base, **extra})
        windows = result.get("windows", windows)
        rows.append((label, result))
    print(f"\nmodel grid {rows[0][1]['grid']}, {windows} windows\n")
    print(f"{'method':<48} {'s':>7} {'GFLOP/s':>8} {'% peak':>7} {'peak RSS MB':>12}")
    for label, result in rows:
        gflops = flops_window * windows / result["seconds"] / 1e9
        print(f"{label:<48} {result['seconds']:>7.2f} {gflops:>8.1f} "
              f"{100 * gflops / peak:>6.1f}% {result['peak_rss_mb']:>12.0f}")
    print("\nend to end: Segmenter.predict, HU 130x512x512 -> 7 masks on the CT grid")
    print(f"{'backend':<48} {'s':>7} {'peak RSS MB':>12}")
    for label, provider, precision in (("onnxruntime CPU", "cpu", "f32"),
                                       ("OpenVINO CPU f32", "openvino", "f32"),
                                       ("OpenVINO CPU bf16 (default)", "openvino", "bf16")):
        result = run_isolated({**base, "method": f"e2e-{provider}", "provider": provider,
                               "precision": precision})
        print(f"{label:<48} {result['seconds']:>7.2f} {result['peak_rss_mb']:>12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
