"""Export a dose checkpoint as a model package of kind ``dose``
(``python -m rtcontour.models.dose.export --checkpoint runs/dose-1/best.pt --version 1.0.0
--evaluate``).

Writes ``model.onnx`` (opset 17, dynamic spatial axes; input ``channels`` (1, C, D, H, W),
output ``dose_gy`` (1, 1, D, H, W)), ``manifest.json``, ``MODEL_CARD.md`` and, with
``--evaluate``, ``validation.json`` with the OpenKBP scores on the validation split.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from rtcontour.models.dose.features import (
    CHANNEL_NAMES,
    DOSE_HU_CLIP,
    MARGIN_MM,
    PTV_SCALE_GY,
)
from rtcontour.models.dose.train import REPO_ROOT, DoseTrainConfig, build_model, load_checkpoint
from rtcontour.models.labels import ORGANS
from rtcontour.models.package import (
    CARD_NAME,
    MANIFEST_NAME,
    OPENKBP_CITATION,
    WEIGHTS_NAME,
    DoseSpec,
    DoseValidation,
    IntensityNormalisation,
    LabelSpec,
    ModelManifest,
    TrainingData,
    load_package,
    sha256_file,
)

__all__ = ["export_onnx", "build_manifest", "write_package", "main"]

log = logging.getLogger(__name__)

# Largest padded model grid of the OpenKBP training patients (slices, rows, columns).
TRAINING_MAX_GRID: tuple[int, int, int] = (80, 48, 80)
MOMENT_LOSS_CITATION = (
    "Jhanwar G, Dahiya N, Ghahremani P, Zarepisheh M, Nadeem S. Domain knowledge driven 3D "
    "dose prediction using moment-based loss function. Phys Med Biol 67:185017, 2022"
)


def export_onnx(model: torch.nn.Module, path: Path, example_shape: Sequence[int]) -> None:
    """Export ``model`` to ONNX opset 17 with dynamic spatial axes."""
    model.eval()
    example = torch.zeros(1, len(CHANNEL_NAMES), *example_shape)
    axes = {2: "slices", 3: "rows", 4: "columns"}
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=["channels"],
                          output_names=["dose_gy"], opset_version=17,
                          dynamic_axes={"channels": axes, "dose_gy": axes}, dynamo=False,
                          do_constant_folding=True)


def build_manifest(config: DoseTrainConfig, name: str, version: str, sha256: str,
                   divisor: int, n_train: int, export_command: str,
                   validation: DoseValidation | None) -> ModelManifest:
    low, high = DOSE_HU_CLIP
    return ModelManifest(
        kind="dose",
        name=name,
        version=version,
        created=datetime.now(UTC),
        architecture=(
            f"3D residual U-Net: {config.levels} levels, base width {config.base_channels}, "
            f"max {config.max_channels} channels, instance norm + LeakyReLU, one linear output "
            f"x {PTV_SCALE_GY:g} Gy; whole body box on the model grid"),
        input_axes="batch, channel (see dose.input_channels), slice (S->I), row (A->P), "
                   "column (R->L)",
        target_spacing_mm=config.target_spacing_mm,
        patch_size=TRAINING_MAX_GRID,
        spatial_divisor=divisor,
        intensity=IntensityNormalisation(clip_hu=(low, high), mean=(low + high) / 2.0,
                                         std=(high - low) / 2.0),
        labels=[LabelSpec(index=i, roi_name=organ.roi_name, colour_rgb=organ.colour_rgb,
                          interpreted_type="ORGAN", single_component=organ.single_component)
                for i, organ in enumerate(ORGANS)],
        output_activation="linear",
        training_data=TrainingData(
            description=(
                f"OpenKBP head-and-neck IMRT plans (train split, {n_train} patients): CT, OARs "
                "in rois_present, PTV56/63/70 with their prescriptions, possible-dose mask, "
                "planned dose; resampled to the model grid over the possible-dose mask"),
            citation=OPENKBP_CITATION,
            n_train_cases=n_train,
            n_validation_cases=validation.n_cases if validation else 0,
        ),
        training_command=list(config.command),
        export_command=export_command,
        dose=DoseSpec(input_channels=list(CHANNEL_NAMES), ptv_channel_scale_gy=PTV_SCALE_GY,
                      body_margin_mm=MARGIN_MM, validation=validation),
        sha256=sha256,
    )


def render_card(manifest: ModelManifest, step: int, evaluate_command: str,
                table: str = "") -> str:
    dose = manifest.dose
    if dose is None:
        raise ValueError("render_card needs a manifest of kind 'dose'")
    scores = (f"dose score **{dose.validation.dose_score_gy:.3f} Gy**, DVH score "
              f"**{dose.validation.dvh_score_gy:.3f} Gy** over {dose.validation.n_cases} "
              f"patients of the OpenKBP {dose.validation.split} split"
              if dose.validation else "not evaluated")
    training = "\n".join(f"    {command}" for command in manifest.training_command)
    return f"""# {manifest.name} {manifest.version}

Head-and-neck dose prediction ("knowledge-based planning") for rtcontour: from a planning CT,
its organs at risk and its PTVs with their prescriptions, the dose distribution (Gy) a good
IMRT plan of the OpenKBP kind would reach.

**Research use only. Not a medical device.** The prediction is not a treatment plan: there
is no RTPLAN, no beams and no deliverability behind it. Use it as a starting point or a check.

## Intended use
Adult head-and-neck IMRT, prescriptions up to 70 Gy in PTVs named with their dose
(PTV70, PTV63, PTV56 as in OpenKBP). OARs it takes: {", ".join(x.roi_name for x in manifest.labels)}
(a missing OAR is an empty channel, as for OpenKBP patients without that contour).

## Model
- {manifest.architecture}
- input channels ({len(dose.input_channels)}): {", ".join(dose.input_channels)}; CT clipped to
  {manifest.intensity.clip_hu} HU and scaled to [-1, 1]; OARs and body as occupancy;
  PTV = prescription / {dose.ptv_channel_scale_gy:g} Gy (the highest where PTVs overlap)
- model grid: {manifest.target_spacing_mm} mm (slice, row, column) over the body's bounding
  box + {dose.body_margin_mm:g} mm, padded to multiples of {manifest.spatial_divisor}; the
  predicted dose is resampled linearly to the CT grid and set to 0 outside the body;
  `DosePredictor` averages it with the prediction for the left/right mirrored patient
  (Parotid_L/Parotid_R swapped), as the scores below were computed
- loss: MAE inside the possible-dose mask + 0.01 x moment loss (p = 1, 2, 10 per OAR and
  PTV) after {MOMENT_LOSS_CITATION}
- training step of the exported checkpoint: {step}; ONNX opset {manifest.onnx_opset},
  sha256 `{manifest.sha256}`

## Data
{manifest.training_data.description}.

Citation: {manifest.training_data.citation}

## Validation (OpenKBP challenge definitions, on the 128^3 CT grid)
Dose score = mean absolute error over the possible-dose mask; DVH score = mean absolute error
of D_0.1cc and mean dose of each OAR and D99, D95, D1 of each PTV. Result: {scores}.
Challenge test-set anchors (a different split): winner 2.43 / 1.48 Gy, a plain 3D U-Net
about 2.8 / 2.2 Gy. The exported checkpoint was chosen by its model-grid MAE on the first
validation patients (`--val-cases`), so the figures are slightly optimistic.

{table}

## Limitations
- Research use only, not a medical device; not validated for clinical use.
- Trained on {manifest.training_data.n_train_cases} OpenKBP plans on a 2-core CPU for {step}
  steps, on a coarse {manifest.target_spacing_mm} mm grid: steep gradients (cord, brainstem
  next to a PTV) are smoothed.
- Only the OpenKBP planning style (9-beam IMRT, 70/63/56 Gy) is represented; other sites,
  techniques, fractionations or prescriptions are untested.
- At inference the body outline from the CT stands in for OpenKBP's possible-dose mask.

## How it was made
Training:

{training}

Export and evaluation:

    {manifest.export_command}
    {evaluate_command}
"""


def _count_train_cases(config: DoseTrainConfig) -> int:
    from rtcontour.models.data import default_data_dir
    from rtcontour.models.dose.data import list_cases

    if config.train_limit:
        return config.train_limit
    try:
        return len(list_cases(Path(config.data_dir) if config.data_dir else default_data_dir(),
                              "train"))
    except FileNotFoundError:
        return 0


def write_package(checkpoint_path: Path, out_root: Path, name: str, version: str,
                  export_command: str, validation: DoseValidation | None = None,
                  table: str = "") -> Path:
    """Export ``checkpoint_path`` into ``out_root/<name>-<version>/``; returns the folder."""
    payload = load_checkpoint(checkpoint_path)
    config = DoseTrainConfig.from_dict(payload["config"])
    model = build_model(config)
    model.load_state_dict(payload["model"])
    folder = out_root / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / WEIGHTS_NAME
    export_onnx(model, onnx_path, (model.divisor * 2,) * 3)
    manifest = build_manifest(config, name, version, sha256_file(onnx_path), model.divisor,
                              _count_train_cases(config), export_command, validation)
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n",
                                        encoding="utf-8")
    shown = folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder
    card = render_card(manifest, int(payload["step"]),
                       f"python -m rtcontour.models.dose.evaluate --package {shown}", table)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
    load_package(folder)
    log.info("wrote dose package %s (%.1f MB weights, step %d)", folder,
             onnx_path.stat().st_size / 1e6, int(payload["step"]))
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.dose.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "runs" / "dose-1" /
                        "best.pt")
    parser.add_argument("--name", default="rtcontour-hn-dose")
    parser.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    parser.add_argument("--out-root", type=Path, default=REPO_ROOT / "models" / "packages")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate on the validation split and record the scores")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N patients only")
    parser.add_argument("--force", action="store_true", help="overwrite an existing package")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.out_root / f"{args.name}-{args.version}"
    if folder.exists():
        if not args.force:
            parser.error(f"{folder} exists; choose a new --version or pass --force")
        shutil.rmtree(folder)
    command = " ".join(["python -m rtcontour.models.dose.export", *argv])
    folder = write_package(args.checkpoint, args.out_root, args.name, args.version, command)
    if args.evaluate:
        from rtcontour.models.data import default_data_dir
        from rtcontour.models.dose.evaluate import evaluate_package, format_table

        results: dict[str, Any] = evaluate_package(folder, args.data_dir or default_data_dir(),
                                                   "validation", args.limit)
        table = format_table(results)
        print(table)  # noqa: T201
        validation = DoseValidation(dose_score_gy=results["dose_score_gy"],
                                    dvh_score_gy=results["dvh_score_gy"],
                                    n_cases=results["n_cases"])
        folder = write_package(args.checkpoint, args.out_root, args.name, args.version,
                               command, validation, table)
        (folder / "validation.json").write_text(json.dumps(results, indent=2) + "\n",
                                                encoding="utf-8")
    print(folder)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
