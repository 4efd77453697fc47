"""The dose prediction's return to the CT grid: 5 x 8 x 8 mm model grid -> 512 x 512 x 130 CT.

    python -m bench.bench_dose_upsampling [--repeats 5]

Times linear (order 1, scipy ``affine_transform``), cubic B-spline as three per-axis matrix
products (``models.resampling.resample_separable``, what ``to_input_grid`` uses) and, for
reference, scipy's 3-D cubic ``affine_transform`` (the same values, 64 taps per voxel), on a
smooth synthetic dose, and prints a table naming the CPU and its flags. A benchmark, not a
test: the machine's load changes the figures.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from rtcontour.models.dose.features import make_model_grid, to_input_grid

CT_SHAPE = (130, 512, 512)
CT_SPACING_MM = (2.5, 0.98, 0.98)


def cpu_description() -> str:
    text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    model = re.search(r"model name\s*:\s*(.+)", text)
    flags = set(re.search(r"flags\s*:\s*(.+)", text).group(1).split())  # type: ignore[union-attr]
    shown = [f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{model.group(1).strip() if model else 'unknown CPU'} ({', '.join(shown)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    body = np.zeros(CT_SHAPE, dtype=bool)
    body[5:125, 60:450, 80:430] = True
    grid = make_model_grid(body, CT_SPACING_MM)
    coarse = np.indices(grid.shape).astype(np.float32)
    centre = [n / 2 for n in grid.shape]
    model_dose = (70.0 * np.exp(-sum(((c - m) * s) ** 2 for c, m, s in
                                     zip(coarse, centre, grid.spacing_mm, strict=True))
                                / 3000.0)).astype(np.float32)
    inverse = [1.0 / f for f in grid.scale]

    def scipy_cubic() -> np.ndarray:
        out = np.empty(grid.crop_shape, dtype=np.float32)
        ndimage.affine_transform(model_dose, np.asarray(inverse), output_shape=grid.crop_shape,
                                 output=out, order=3, mode="nearest", prefilter=True)
        return out

    methods = {
        "linear (affine_transform, order 1)": lambda: to_input_grid(model_dose, grid, CT_SHAPE,
                                                                    order=1),
        "cubic, separable (to_input_grid)": lambda: to_input_grid(model_dose, grid, CT_SHAPE),
        "cubic, scipy 3-D affine_transform": scipy_cubic,
    }
    print(f"CPU: {cpu_description()}")  # noqa: T201
    print(f"model grid {grid.shape} -> CT {CT_SHAPE} (box {grid.crop_shape}), "  # noqa: T201
          f"{args.repeats} runs each, median seconds")
    print("| method | seconds |\n| --- | --- |")  # noqa: T201
    results = {}
    for name, method in methods.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            results[name] = method()
            times.append(time.perf_counter() - started)
        print(f"| {name} | {statistics.median(times):.2f} |")  # noqa: T201
    separable = results["cubic, separable (to_input_grid)"][grid.box]
    reference = np.maximum(results["cubic, scipy 3-D affine_transform"], 0.0)
    print(f"max |separable - scipy 3-D| = {np.abs(separable - reference).max():.2e} Gy")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
