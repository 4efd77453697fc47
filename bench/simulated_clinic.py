"""A clinic simulated on real data (issue 23): does fine-tuning teach the model its style?

The "clinic" is the first ``--patients`` OpenKBP validation patients (never trained on by the
shipped packages). Its clinicians draw two things their own way, consistently:

- **parotids grown** by ``--grow-mm`` (2.5 mm): every voxel within that distance (Euclidean,
  in mm on the CT grid) of the OpenKBP parotid;
- **the cord stops at a fixed level**: ``--cord-mm`` (120 mm) below its superior end (the
  foramen magnum), whatever the scan's extent.

Each patient's CT and restyled approved contours are kept with :meth:`SiteDataset.keep`, the
function the worker's KeepForTraining step calls on an approved RTSTRUCT (the DICOM path to it
is tested end to end in ``tests/test_site_learning_end_to_end.py``; here the OpenKBP arrays are
handed to it directly, already in canonical orientation). Organs OpenKBP lacks for a patient
are unknown. Then :func:`models.finetune.finetune` runs as ``rtcontour finetune`` would, and
the table compares base and fine-tuned package on the clinic's held-back patients (its style)
and on the remaining OpenKBP validation patients with their OpenKBP references (general skill).

    nice -n 15 python -m bench.simulated_clinic --steps 200 --threads 1

Prints the two tables and writes ``<out>/report.json``; the package goes to ``<out>/packages``
(not to models/packages).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw
from rtcontour.models.labels import ORGANS
from rtcontour.models.package import FineTuneReport, load_package
from rtcontour.models.site_data import SiteDataset

NAMES = [organ.roi_name for organ in ORGANS]
CLINIC_NAMES = {"Brainstem": "BrainStem", "SpinalCord": "Cord", "Parotid_L": "Parotid Lt",
                "Parotid_R": "Parotid Rt", "Esophagus": "Oesophagus", "Larynx": "Larynx",
                "Bone_Mandible": "Mandible"}


def grow(mask: np.ndarray, spacing_mm: tuple[float, ...], grow_mm: float) -> np.ndarray:
    """Every voxel within ``grow_mm`` of ``mask`` (bool, (slices, rows, columns))."""
    if not mask.any():
        return mask
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return np.asarray(distance <= grow_mm + 1e-6)


def stop_cord(mask: np.ndarray, spacing_mm: tuple[float, ...], length_mm: float) -> np.ndarray:
    """The cord from its superior end down ``length_mm`` (axis 0 runs superior->inferior)."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices.size == 0:
        return mask
    last = slices[0] + int(round(length_mm / spacing_mm[0]))
    stopped = mask.copy()
    stopped[last + 1:] = False
    return stopped


def clinic_style(masks: np.ndarray, known: np.ndarray, spacing_mm: tuple[float, ...],
                 grow_mm: float, cord_mm: float) -> dict[str, np.ndarray]:
    """organ -> the clinic's approved mask (known organs only)."""
    styled = {}
    for channel, name in enumerate(NAMES):
        if not known[channel]:
            continue
        mask = masks[channel]
        if name in ("Parotid_L", "Parotid_R"):
            mask = grow(mask, spacing_mm, grow_mm)
        elif name == "SpinalCord":
            mask = stop_cord(mask, spacing_mm, cord_mm)
        styled[name] = mask
    return styled


def _row(name: str, metric: dict) -> str:
    def number(value: float | None, digits: int) -> str:
        return "   -  " if value is None else f"{value:6.{digits}f}"

    change = (None if metric["base_dice"] is None or metric["new_dice"] is None
              else metric["new_dice"] - metric["base_dice"])
    return (f"| {name:<13} | {number(metric['base_dice'], 3)} | {number(metric['new_dice'], 3)} "
            f"| {'   -  ' if change is None else f'{change:+6.3f}'} "
            f"| {number(metric['base_hd95_mm'], 1)} | {number(metric['new_hd95_mm'], 1)} "
            f"| {metric['n_cases']:>2} |")


def table(title: str, metrics: dict) -> str:
    lines = [title, "",
             "| structure     | base Dice | new Dice | change | base HD95 | new HD95 | n |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_row(name, metric) for name, metric in metrics.items()]
    dices = [(m["base_dice"], m["new_dice"]) for m in metrics.values()
             if m["base_dice"] is not None and m["new_dice"] is not None]
    if dices:
        base, new = np.mean([d[0] for d in dices]), np.mean([d[1] for d in dices])
        lines.append(f"| **mean**      | {base:6.3f} | {new:6.3f} | {new - base:+6.3f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path,
                        default=Path("models/packages/rtcontour-hn-oar-1.2.0"))
    parser.add_argument("--patients", type=int, default=24,
                        help="the clinic: the first N validation patients (the rest check "
                             "the OpenKBP skill)")
    parser.add_argument("--grow-mm", type=float, default=2.5)
    parser.add_argument("--cord-mm", type=float, default=120.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-sets", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--openkbp-limit", type=int, default=None,
                        help="OpenKBP patients after the clinic's to compare on (default: all)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("var/simulated-clinic"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rtcontour.models.finetune import finetune

    data_dir = args.data_dir or default_data_dir()
    paths = list_cases(data_dir, "validation")
    clinic, rest = paths[:args.patients], paths[args.patients:][:args.openkbp_limit]
    target = load_package(args.package).manifest.target_spacing_mm
    dataset = SiteDataset(args.out / "site-dataset")
    started = time.monotonic()
    for path in clinic:
        hu, masks, known, spacing = load_openkbp_raw(path, reference_qa=True)
        styled = clinic_style(masks, known, spacing, args.grow_mm, args.cord_mm)
        dataset.keep(path.stem, hu=hu, spacing_mm=spacing, organ_masks=styled,
                     organ_names=CLINIC_NAMES, patient_id=path.stem, target_spacing_mm=target,
                     route="simulated-clinic")
    kept_s = time.monotonic() - started
    packages = args.out / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    command = ("nice -n 15 python -m bench.simulated_clinic "
               f"--package {args.package} --patients {args.patients} --grow-mm {args.grow_mm:g} "
               f"--cord-mm {args.cord_mm:g} --steps {args.steps} --threads {args.threads} "
               f"--min-sets {args.min_sets} --lr {args.lr:g}"
               + (f" --openkbp-limit {args.openkbp_limit}" if args.openkbp_limit is not None
                  else ""))
    result = finetune(args.package, "simclinic", dataset, packages, steps=args.steps,
                      min_sets=args.min_sets, lr=args.lr, threads=args.threads, device="auto",
                      openkbp_dir=data_dir, openkbp_limit=len(rest),
                      openkbp_offset=args.patients, command=command)
    report: FineTuneReport = result.report
    values = report.model_dump(mode="json")
    print(table(f"Held-back clinic patients ({report.n_held_back_sets}; the clinic's style: "
                f"parotids +{args.grow_mm:g} mm, cord {args.cord_mm:g} mm)",
                values["site_metrics"]))  # noqa: T201
    print()  # noqa: T201
    print(table(f"OpenKBP validation patients {args.patients + 1}-{args.patients + len(rest)} "
                "(OpenKBP "
                "references)", values["openkbp_metrics"]))  # noqa: T201
    print(f"\n{result.package.name}: {'recommended' if report.recommended else 'NOT recommended'}"
          f"; {report.steps} steps on {report.n_train_sets} sets; kept in {kept_s:.0f} s, "
          f"fine-tuned and compared in {result.seconds:.0f} s")  # noqa: T201
    (args.out / "report.json").write_text(json.dumps(
        {"command": command, "package": str(result.package), "seconds": result.seconds,
         **values}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
