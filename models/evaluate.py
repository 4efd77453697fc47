"""Evaluate a model package on the OpenKBP validation split (``rtcontour evaluate``).

Each patient goes through :class:`models.inference.Segmenter` exactly as in the service
(HU array in, masks on the CT grid out). Dice and HD95 (mm) per structure, counting only
patients whose ``rois_present`` lists the structure and whose reference contour passes
:mod:`models.reference_qa`; the same figures over every listed reference are reported beside
them (``per_structure_all_references``), and the set-aside references are named.

Each predicted structure's confidence (``Segmenter.segment``) is recorded beside its Dice
(``structures``), and ``confidence`` says how well it finds the poor contours (Dice below
``POOR_DICE``, checked references): the AUROC, the threshold that maximises Youden's J, and
what the segmenter's own threshold flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw
from rtcontour.models.inference import Segmenter
from rtcontour.models.labels import ORGANS
from rtcontour.models.package import find_latest_package
from rtcontour.models.quality import auroc, youden_threshold
from rtcontour.models.reference_qa import reference_problems

__all__ = ["dice", "hd95_mm", "evaluate_package", "confidence_report", "format_table", "main"]

# A contour below this Dice is one a clinician would redraw: what the review flag should find.
POOR_DICE = 0.6

log = logging.getLogger(__name__)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def hd95_mm(prediction: np.ndarray, reference: np.ndarray,
            spacing_mm: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm between mask surfaces (the larger
    of the two directed 95th percentiles); ``None`` when either mask is empty."""
    if not prediction.any() or not reference.any():
        return None
    pred_surface, ref_surface = _surface(prediction), _surface(reference)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_mm)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_mm)
    return float(max(np.percentile(to_ref[pred_surface], 95),
                     np.percentile(to_pred[ref_surface], 95)))


def evaluate_package(
    package: Path,
    data_dir: Path,
    split: str = "validation",
    overlap: float = 0.5,
    mirror_tta: bool = False,
    provider: str = "auto",
    limit: int | None = None,
    offset: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Per-structure mean Dice / HD95 of ``package`` on an OpenKBP split (its patients
    ``offset`` to ``offset + limit`` in patient-number order)."""
    segmenter = Segmenter(package, overlap=overlap, mirror_tta=mirror_tta, provider=provider,
                          threads=threads)
    paths = list_cases(data_dir, split)[offset:]
    paths = paths[:limit]
    names = [label.roi_name for label in segmenter.manifest.labels]
    if names != [organ.roi_name for organ in ORGANS]:
        raise ValueError(f"{package} labels {names} are not the OpenKBP structures")
    checked = _Scores(names)
    everything = _Scores(names)
    set_aside: list[dict[str, Any]] = []
    structures: list[dict[str, Any]] = []
    started = time.monotonic()
    for number, path in enumerate(paths, start=1):
        hu, masks, known, spacing = load_openkbp_raw(path, reference_qa=False)
        problems = reference_problems(masks, known, spacing, hu)
        segmentation = segmenter.segment(hu.astype(np.float32), spacing)
        predicted = segmentation.masks
        for channel, name in enumerate(names):
            quality = segmentation.quality.get(name)
            record: dict[str, Any] = {
                "case": path.stem, "structure": name, "known": bool(known[channel]),
                "reference_checked": bool(known[channel]) and channel not in problems,
                "dice": None, "confidence": None, "flag": None,
                "volume_cc": None if quality is None else quality.volume_cc,
                "dropped": segmentation.dropped.get(name),
            }
            if quality is not None:
                record.update(confidence=quality.confidence, flag=quality.flag,
                              probability=quality.probability,
                              edge_sharpness=quality.edge_sharpness,
                              volume_score=quality.volume_score)
            structures.append(record)
            if not known[channel]:
                continue
            score = dice(predicted[name], masks[channel])
            record["dice"] = score
            distance = hd95_mm(predicted[name], masks[channel], spacing)
            empty = not predicted[name].any()
            everything.add(name, score, distance, empty)
            if channel in problems:
                set_aside.append({"case": path.stem, "structure": name, "dice": score,
                                  "reason": problems[channel]})
            else:
                checked.add(name, score, distance, empty)
        log.info("%d/%d %s done", number, len(paths), path.stem)
    per_structure = checked.summary()
    all_references = everything.summary()
    return {
        "package": str(package),
        "split": split,
        "n_cases": len(paths),
        "cases": [path.stem for path in paths],
        "backend": segmenter.backend,
        "overlap": overlap,
        "mirror_tta": mirror_tta,
        "seconds_per_case": (time.monotonic() - started) / max(1, len(paths)),
        "per_structure": per_structure,
        **_means(per_structure),
        "references_set_aside": set_aside,
        "per_structure_all_references": all_references,
        "all_references": _means(all_references),
        "structures": structures,
        "confidence": confidence_report(structures, segmenter.review_threshold),
    }


def confidence_report(structures: Sequence[dict[str, Any]],
                      review_threshold: float) -> dict[str, Any]:
    """How well confidence finds the poor contours among predicted structures with a checked
    reference: AUROC (low confidence ranking Dice < POOR_DICE first), the Youden threshold, and
    sensitivity/specificity of ``review_threshold``. Missed structures (empty prediction of a
    contoured organ) have no confidence and are counted apart."""
    scored = [r for r in structures
              if r["reference_checked"] and r["confidence"] is not None]
    missed = sum(1 for r in structures if r["reference_checked"] and r["confidence"] is None)
    confidences = [float(r["confidence"]) for r in scored]
    poor = [float(r["dice"]) < POOR_DICE for r in scored]
    report: dict[str, Any] = {
        "poor_dice": POOR_DICE, "n_scored": len(scored), "n_poor": int(sum(poor)),
        "n_missed": missed, "review_threshold": review_threshold,
        "auroc": auroc([-c for c in confidences], poor),
    }
    for part in ("probability", "edge_sharpness", "volume_score"):
        report[f"auroc_{part}"] = auroc([-float(r[part]) for r in scored], poor)
    if confidences and 0 < sum(poor) < len(poor):
        threshold, j = youden_threshold(confidences, poor)
        report["youden_threshold"], report["youden_j"] = threshold, j
    flagged = [c < review_threshold for c in confidences]
    n_poor, n_good = max(1, sum(poor)), max(1, len(poor) - sum(poor))
    report["sensitivity"] = sum(f and p for f, p in zip(flagged, poor, strict=True)) / n_poor
    report["specificity"] = sum(not f and not p
                                for f, p in zip(flagged, poor, strict=True)) / n_good
    report["n_flagged"] = int(sum(flagged))
    return report


class _Scores:
    """Dice and HD95 lists per structure (HD95 only where the prediction is not empty)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.dices: dict[str, list[float]] = {name: [] for name in names}
        self.distances: dict[str, list[float]] = {name: [] for name in names}
        self.missed: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, score: float, distance: float | None, empty: bool) -> None:
        self.dices[name].append(score)
        self.missed[name] += empty
        if distance is not None:
            self.distances[name].append(distance)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "dice": float(np.mean(values)),
                "hd95_mm": (float(np.mean(self.distances[name])) if self.distances[name]
                            else None),
                "n_cases": len(values),
                "n_empty_predictions": self.missed[name],
            }
            for name, values in self.dices.items()
            if values
        }


def _means(per_structure: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    hd_values = [r["hd95_mm"] for r in per_structure.values() if r["hd95_mm"] is not None]
    return {
        "mean_dice": float(np.mean([r["dice"] for r in per_structure.values()])),
        "mean_hd95_mm": float(np.mean(hd_values)) if hd_values else None,
    }


def format_table(results: dict[str, Any]) -> str:
    """Per-structure table: checked references first, every listed reference beside them."""
    every = results["per_structure_all_references"]
    lines = [f"{'structure':<14} {'Dice':>6} {'HD95 mm':>8} {'n':>3}   "
             f"{'all references: Dice':>20} {'HD95 mm':>8} {'n':>3}", "-" * 70]

    def hd(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, row in every.items():
        ours = results["per_structure"].get(name)
        left = (f"{ours['dice']:>6.3f} {hd(ours['hd95_mm']):>8} {ours['n_cases']:>3}" if ours
                else f"{'-':>6} {'-':>8} {0:>3}")
        lines.append(f"{name:<14} {left}   {row['dice']:>20.3f} {hd(row['hd95_mm']):>8} "
                     f"{row['n_cases']:>3}")
    overall = results["all_references"]
    lines += ["-" * 70,
              f"{'mean':<14} {results['mean_dice']:>6.3f} {hd(results['mean_hd95_mm']):>8}     "
              f"{overall['mean_dice']:>20.3f} {hd(overall['mean_hd95_mm']):>8}",
              f"({results['n_cases']} patients, {results['backend']}, "
              f"{results['seconds_per_case']:.1f} s/patient)"]
    report = results.get("confidence")
    if report and report["auroc"] is not None:
        lines.append(
            f"confidence vs Dice < {report['poor_dice']:g}: AUROC {report['auroc']:.3f} "
            f"({report['n_poor']} poor of {report['n_scored']} predicted, {report['n_missed']} "
            f"missed); review below {report['review_threshold']:g} flags {report['n_flagged']}: "
            f"sensitivity {report['sensitivity']:.2f}, specificity {report['specificity']:.2f}"
            + (f"; Youden threshold {report['youden_threshold']:.3f} (J {report['youden_j']:.2f})"
               if "youden_threshold" in report else ""))
        lines.append("  AUROC of the parts: " + ", ".join(
            f"{part} {report[f'auroc_{part}']:.3f}" for part in
            ("probability", "edge_sharpness", "volume_score")
            if report[f"auroc_{part}"] is not None))
    if results["references_set_aside"]:
        lines.append("reference contours set aside by the plausibility check "
                     "(models.reference_qa):")
        lines += [f"  {r['case']} {r['structure']}: Dice {r['dice']:.3f}; {r['reason']}"
                  for r in results["references_set_aside"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``rtcontour evaluate``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rtcontour evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=None,
                        help="package folder (default: latest under models/packages)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="OpenKBP folder (default: RTCONTOUR_OPENKBP_DIR, else "
                             "../shared/data/openkbp)")
    parser.add_argument("--split", default="validation",
                        help="OpenKBP split folder to evaluate on (default: validation)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap, 0-0.9 (default: 0.5)")
    parser.add_argument("--mirror-tta", action="store_true",
                        help="also predict the left/right mirrored CT and average")
    parser.add_argument("--provider", default="auto",
                        help="auto (CUDA if available, else the CPU default), cuda, cpu, "
                             "onnxruntime or openvino")
    parser.add_argument("--limit", type=int, default=None, help="evaluate N patients only")
    parser.add_argument("--offset", type=int, default=0,
                        help="skip the first N patients (patient-number order)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    package = args.package or find_latest_package()
    results = evaluate_package(package, args.data_dir or default_data_dir(), args.split,
                               args.overlap, args.mirror_tta, args.provider, args.limit,
                               args.offset, args.threads)
    print(format_table(results))  # noqa: T201
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
