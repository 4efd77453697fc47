"""Export a training checkpoint as a model package (``rtcontour export``).

Writes ``models/packages/<name>-<version>/`` with ``model.onnx`` (opset 17, dynamic batch and
spatial axes), ``manifest.json`` and ``MODEL_CARD.md``. With ``--evaluate`` the package is run
through :class:`models.inference.Segmenter` on the OpenKBP validation split first and the
per-structure Dice / HD95 go into the manifest and the card. The command's options are in
:mod:`models.export_cli`, which needs no torch.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from rtcontour.models.data import REPO_ROOT, default_data_dir, list_cases
from rtcontour.models.export_cli import build_parser
from rtcontour.models.labels import LR_SWAP_PAIRS, ORGANS
from rtcontour.models.package import (
    CARD_NAME,
    MANIFEST_NAME,
    OPENKBP_CITATION,
    WEIGHTS_NAME,
    IntensityNormalisation,
    LabelSpec,
    ModelManifest,
    TrainingData,
    ValidationMetric,
    load_package,
    sha256_file,
)
from rtcontour.models.reference_qa import FACTOR
from rtcontour.models.train import build_model, load_checkpoint
from rtcontour.models.train_config import TrainConfig

__all__ = ["export_onnx", "build_manifest", "checkpoint_weights", "write_package", "main"]

log = logging.getLogger(__name__)


def export_onnx(model: torch.nn.Module, patch_size: Sequence[int], path: Path) -> None:
    """Export ``model`` to ONNX opset 17 with dynamic batch and spatial axes (its ``forward``:
    one logits output; deep-supervision heads are training-only and not exported)."""
    model.eval()
    example = torch.zeros(1, 1, *patch_size)
    axes = {0: "batch", 2: "slices", 3: "rows", 4: "columns"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={"image": axes, "logits": axes},
            dynamo=False,
            do_constant_folding=True,
        )


def build_manifest(
    config: TrainConfig,
    name: str,
    version: str,
    sha256: str,
    metrics: dict[str, ValidationMetric],
    n_train: int,
    n_validation: int,
    export_command: str,
    divisor: int,
) -> ModelManifest:
    clip = config.hu_clip
    architecture = (
        f"3D residual U-Net ({config.arch}): {config.levels} levels, base width "
        f"{config.base_channels}, max {config.max_channels} channels, instance norm + "
        "LeakyReLU, stride-2 conv down, transposed-conv up, sigmoid multi-label output"
    )
    return ModelManifest(
        name=name,
        version=version,
        created=datetime.now(UTC),
        architecture=architecture,
        target_spacing_mm=config.target_spacing_mm,
        patch_size=config.patch_size,
        spatial_divisor=divisor,
        intensity=IntensityNormalisation(
            clip_hu=clip, mean=(clip[0] + clip[1]) / 2.0, std=(clip[1] - clip[0]) / 2.0
        ),
        labels=[
            LabelSpec(index=i, roi_name=o.roi_name, colour_rgb=o.colour_rgb,
                      interpreted_type="ORGAN", single_component=o.single_component)
            for i, o in enumerate(ORGANS)
        ],
        mirror_axes=(2,),
        mirror_channel_swaps=list(LR_SWAP_PAIRS),
        training_data=TrainingData(
            description=(
                "OpenKBP head-and-neck CT (train split, "
                f"{n_train} patients; loss masked for structures not in rois_present"
                + ("; references failing the plausibility check of models.reference_qa "
                   "treated as not contoured" if config.reference_qa else "")
                + "); resampled to the target spacing"
            ),
            citation=OPENKBP_CITATION,
            n_train_cases=n_train,
            n_validation_cases=n_validation,
        ),
        validation_metrics=metrics,
        training_command=list(config.command),
        export_command=export_command,
        sha256=sha256,
    )


def render_card(manifest: ModelManifest, evaluate_command: str, step: int,
                evaluation_notes: str = "", weights_note: str = "") -> str:
    rows = []
    for label in manifest.labels:
        metric = manifest.validation_metrics.get(label.roi_name)
        if metric is None:
            rows.append(f"| {label.roi_name} | - | - | 0 |")
        else:
            hd = "-" if metric.hd95_mm is None else f"{metric.hd95_mm:.1f}"
            rows.append(f"| {label.roi_name} | {metric.dice:.3f} | {hd} | {metric.n_cases} |")
    dices = [m.dice for m in manifest.validation_metrics.values()]
    hds = [m.hd95_mm for m in manifest.validation_metrics.values() if m.hd95_mm is not None]
    if dices:
        mean_hd = f"{sum(hds) / len(hds):.1f}" if hds else "-"
        rows.append(f"| **mean** | **{sum(dices) / len(dices):.3f}** | **{mean_hd}** | |")
    training = "\n".join(f"    {command}" for command in manifest.training_command)
    return f"""# {manifest.name} {manifest.version}

Head-and-neck organ-at-risk auto-contouring model for rtcontour.

**Research use only. Not a medical device.** Contours must be reviewed and edited by a
qualified person before any clinical use.

## Intended use
Draft contours of {", ".join(label.roi_name for label in manifest.labels)} on axial
head-and-neck planning CTs of adults (head first supine), input in canonical orientation
(slices superior->inferior, rows anterior->posterior, columns right->left).

## Model
- {manifest.architecture}
- input: CT resampled to {manifest.target_spacing_mm} mm (slice, row, column), HU clipped
  to {manifest.intensity.clip_hu} and scaled to [-1, 1]; patch {manifest.patch_size}
- sliding window with Gaussian blending; mirror TTA along axis {manifest.mirror_axes}
  (Parotid_L/Parotid_R swapped back); probabilities resampled linearly to the CT grid,
  threshold 0.5, largest connected component, holes filled per slice
- training step of the exported checkpoint: {step}{weights_note}; ONNX opset {manifest.onnx_opset},
  sha256 `{manifest.sha256}`

## Data
{manifest.training_data.description}. Validation: OpenKBP validation split
({manifest.training_data.n_validation_cases} patients; the first few (`--val-cases`) were also
used to pick the checkpoint, so the figures below are slightly optimistic).

Citation: {manifest.training_data.citation}

## Validation metrics (OpenKBP validation split)
Only patients with the structure in `rois_present` count, and only references that pass the
plausibility check of `models.reference_qa` (mean cross-section within {1 / FACTOR:g}x to
{FACTOR:g}x of the organ's typical value). HD95 in mm on the OpenKBP grid.

| structure | Dice | HD95 (mm) | patients |
| --- | --- | --- | --- |
{chr(10).join(rows)}

{evaluation_notes}
## Limitations
- Research use only, not a medical device; not validated for clinical use.
- Trained on {manifest.training_data.n_train_cases} OpenKBP patients at ~4 mm in-plane
  resolution, {step} steps on a 2-core CPU: coarse boundaries; small structures (Esophagus,
  Larynx) are the least reliable.
- OpenKBP contours vary in extent between patients (e.g. SpinalCord and Esophagus length).
- Unseen anatomy, contrast, implants, other sites or pediatric patients are untested.

## How it was made
Training:

{training}

Export and evaluation:

    {manifest.export_command}
    {evaluate_command}
"""


def checkpoint_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint ships: the moving average when its run kept one (its
    validation judged those), else the raw weights."""
    config = TrainConfig.from_dict(payload["config"])
    if config.ema_decay > 0.0 and "ema" in payload:
        log.info("exporting the EMA weights (decay %g, %d updates)", config.ema_decay,
                 int(payload["ema"]["updates"]))
        return dict(payload["ema"]["average"])
    return dict(payload["model"])


def _count_train_cases(config: TrainConfig) -> int:
    try:
        return len(list_cases(Path(config.data_dir) if config.data_dir else default_data_dir(),
                              "train"))
    except FileNotFoundError:
        return 0


def write_package(
    checkpoint_path: Path,
    out_root: Path,
    name: str,
    version: str,
    export_command: str,
    metrics: dict[str, ValidationMetric] | None = None,
    n_validation: int = 0,
    evaluation_notes: str = "",
) -> Path:
    """Export ``checkpoint_path`` into ``out_root/<name>-<version>/``; returns the folder
    (``evaluation_notes``: markdown put under the card's metrics table)."""
    payload = load_checkpoint(checkpoint_path)
    config = TrainConfig.from_dict(payload["config"])
    model = build_model(config)
    model.load_state_dict(checkpoint_weights(payload))
    folder = out_root / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / WEIGHTS_NAME
    export_onnx(model, config.patch_size, onnx_path)
    n_train = config.train_limit or _count_train_cases(config)
    manifest = build_manifest(
        config, name, version, sha256_file(onnx_path), metrics or {}, n_train, n_validation,
        export_command, model.divisor,
    )
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n",
                                        encoding="utf-8")
    shown = folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder
    evaluate_command = f"python -m rtcontour.models.evaluate --package {shown}"
    weights_note = (f" (moving average of the weights, decay {config.ema_decay:g})"
                    if config.ema_decay > 0.0 and "ema" in payload else "")
    (folder / CARD_NAME).write_text(render_card(manifest, evaluate_command, int(payload["step"]),
                                                evaluation_notes, weights_note),
                                    encoding="utf-8")
    load_package(folder)
    log.info("wrote package %s (%.1f MB weights, step %d)", folder,
             onnx_path.stat().st_size / 1e6, int(payload["step"]))
    return folder


def _set_aside_notes(results: dict[str, Any]) -> str:
    """Card lines on the references the plausibility check set aside (see validation.json)."""
    set_aside = results["references_set_aside"]
    if not set_aside:
        return ""
    overall = results["all_references"]
    hd = "-" if overall["mean_hd95_mm"] is None else f"{overall['mean_hd95_mm']:.1f}"
    lines = [f"Over every listed reference, including the {len(set_aside)} set aside: mean Dice "
             f"{overall['mean_dice']:.3f}, HD95 {hd} mm (per structure in `validation.json`). "
             "Set aside:", ""]
    lines += [f"- {r['case']} {r['structure']} (Dice {r['dice']:.3f}): {r['reason']}"
              for r in set_aside]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``rtcontour export``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.out_root / f"{args.name}-{args.version}"
    if folder.exists():
        if not args.force:
            parser.error(f"{folder} exists; choose a new --version or pass --force")
        shutil.rmtree(folder)
    command = " ".join(["rtcontour export", *argv])
    folder = write_package(args.checkpoint, args.out_root, args.name, args.version, command)
    if args.evaluate:
        from rtcontour.models.evaluate import evaluate_package, format_table

        data_dir = args.data_dir or default_data_dir()
        results = evaluate_package(folder, data_dir, overlap=args.overlap,
                                   mirror_tta=args.mirror_tta, limit=args.limit)
        print(format_table(results))  # noqa: T201
        metrics = {
            name: ValidationMetric(dice=r["dice"], hd95_mm=r["hd95_mm"], n_cases=r["n_cases"])
            for name, r in results["per_structure"].items()
        }
        shutil.rmtree(folder)
        folder = write_package(args.checkpoint, args.out_root, args.name, args.version, command,
                               metrics=metrics, n_validation=int(results["n_cases"]),
                               evaluation_notes=_set_aside_notes(results))
        (folder / "validation.json").write_text(json.dumps(results, indent=2) + "\n",
                                                encoding="utf-8")
    print(folder)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
