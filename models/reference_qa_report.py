"""``python -m rtcontour.models.reference_qa_report --split train|validation``: the reference
contours of
an OpenKBP split that fail the plausibility check of :mod:`models.reference_qa`, and the
split's median cross-section per structure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw
from rtcontour.models.labels import ORGANS
from rtcontour.models.reference_qa import mean_cross_section_mm2, reference_problems


def main(argv: Sequence[str] | None = None) -> int:
    """List the failing references of an OpenKBP split and the split's median cross-sections."""
    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.reference_qa_report",
                                     description=main.__doc__)
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    data_dir = default_data_dir() if args.data_dir is None else args.data_dir
    areas: dict[str, list[float]] = {organ.roi_name: [] for organ in ORGANS}
    lines = []
    for path in list_cases(data_dir, args.split):
        hu, masks, known, spacing = load_openkbp_raw(path, reference_qa=False)
        for channel, organ in enumerate(ORGANS):
            if known[channel] and masks[channel].any():
                areas[organ.roi_name].append(mean_cross_section_mm2(masks[channel], spacing))
        for channel, reason in reference_problems(masks, known, spacing, hu).items():
            lines.append(f"{path.stem:<8} {ORGANS[channel].roi_name:<14} {reason}")
    out = sys.stdout
    out.write(f"{'structure':<14} {'n':>4} {'median mm^2':>12}\n")
    for name, values in areas.items():
        out.write(f"{name:<14} {len(values):>4} {float(np.median(values)):>12.0f}\n")
    out.write(f"\n{len(lines)} implausible reference contour(s) in {args.split}:\n")
    out.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
