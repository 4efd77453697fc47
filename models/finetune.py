"""Fine-tune a model package on the site's kept approved structure sets (``rtcontour finetune``).

Starts from a **package**, not a checkpoint (a package ships no training checkpoint): the
network of the architecture its manifest names is built with :func:`models.train.build_model`
and its weights are read from the ONNX initializers (:func:`network_from_package`; every
parameter must be found, so a package of another architecture is refused, not guessed).
Training is :func:`models.train.train` with the contour campaign's recipe (issue 20): soft
targets, spatial augmentation p 0.25, intensity augmentation, EMA (decay
``min(0.999, 1 - 10 / steps)``, so the average follows a short run) and 2 deep-supervision
heads, AdamW at a tenth of the campaign's learning rate with a short warm-up, on the GPU when
torch sees one. The run starts from a step-0 checkpoint holding the package's weights, so
``train`` is called exactly as for a resume.

Held back: a fixed share of the **patients** (a patient is held back when the sha256 of its key
falls below the share, at least one patient), never trained on; base and new package are both
run through :class:`models.inference.Segmenter` (the service's own inference, post-processing
included) on those sets' CT on the model grid, and on OpenKBP validation patients when the
data is there. A structure whose held-back Dice drops by more than ``worse_margin`` is
"worse": the package is then marked not recommended (manifest ``finetune.recommended`` and
the model card, the structure in red).

Guards: fewer kept sets of a structure than ``min_sets`` refuses the run (``FinetuneRefused``
naming each), unless the structure is excluded; the new version ``<base>+<site>.<n>`` takes the
next free ``n`` and a package folder is never written over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtcontour.common.errors import RtcontourError
from rtcontour.models.data import SOFT_SCALE, default_data_dir
from rtcontour.models.evaluate import dice, hd95_mm
from rtcontour.models.finetune_cli import DEFAULT_HOLDOUT, SITE_NAME, build_parser
from rtcontour.models.inference import Segmenter
from rtcontour.models.labels import ORGANS
from rtcontour.models.package import (
    CARD_NAME,
    MANIFEST_NAME,
    FineTuneReport,
    ModelPackage,
    SiteMetric,
    TrainingData,
    ValidationMetric,
    load_package,
)
from rtcontour.models.site_data import KeptSet, SiteDataset
from rtcontour.models.train import CHECKPOINT_FORMAT, _lr_lambda, build_model, train
from rtcontour.models.train_config import TrainConfig

__all__ = [
    "FinetuneRefused",
    "FinetuneResult",
    "config_from_manifest",
    "finetune",
    "held_back_patients",
    "main",
    "network_from_package",
    "next_version",
    "onnx_weights",
]

log = logging.getLogger(__name__)

_ARCHITECTURE = re.compile(
    r"\((?P<arch>unet|deep)\): (?P<levels>\d+) levels, base width (?P<base>\d+), "
    r"max (?P<max>\d+) channels")


class FinetuneRefused(RtcontourError):  # noqa: N818 - a refusal with a sentence
    """A fine-tuning run that the guards refuse (the sentence says why)."""


@dataclass
class FinetuneResult:
    """What a run wrote: the package folder and its report."""

    package: Path
    report: FineTuneReport
    seconds: float
    log_lines: list[str] = field(default_factory=list)


# -- the package's network in torch -----------------------------------------------------------
def config_from_manifest(package: ModelPackage, **recipe: Any) -> TrainConfig:
    """A :class:`TrainConfig` of the package's architecture (parsed from the manifest's
    ``architecture`` sentence, written by :func:`models.export.build_manifest`), its patch,
    spacing and HU clip, plus ``recipe`` options."""
    manifest = package.manifest
    match = _ARCHITECTURE.search(manifest.architecture)
    if match is None or manifest.kind != "segmentation":
        raise FinetuneRefused(
            f"package {package.path.name}: its architecture {manifest.architecture!r} is not "
            "one rtcontour can rebuild for training (a residual U-Net exported by "
            "rtcontour export)")
    if [label.roi_name for label in manifest.labels] != [organ.roi_name for organ in ORGANS]:
        raise FinetuneRefused(f"package {package.path.name}: its structures are not "
                              f"{', '.join(organ.roi_name for organ in ORGANS)}")
    return TrainConfig(
        arch=match["arch"], levels=int(match["levels"]), base_channels=int(match["base"]),
        max_channels=int(match["max"]), patch_size=tuple(manifest.patch_size),  # type: ignore[arg-type]
        target_spacing_mm=tuple(manifest.target_spacing_mm),  # type: ignore[arg-type]
        hu_clip=tuple(manifest.intensity.clip_hu),  # type: ignore[arg-type]
        **recipe)


def onnx_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    """Parameter name -> array from an exported network's ONNX initializers. The exporter
    stores a tensor once when two parameters are equal and reads the other through an
    ``Identity`` node named after it; those aliases are resolved."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in weights:
            for output in node.output:
                weights.setdefault(output, weights[node.input[0]])
    return weights


def network_from_package(package: ModelPackage, config: TrainConfig) -> torch.nn.Module:
    """The package's network in torch, weights from its ONNX file. Deep-supervision heads (not
    exported) start fresh; any other parameter or buffer missing, or a shape that differs, is
    ``FinetuneRefused``."""
    model = build_model(config)
    weights = onnx_weights(package.onnx_path)
    state = model.state_dict()
    missing = [name for name in state if name not in weights
               and not name.startswith("aux_heads.")]
    wrong = [f"{name} {tuple(weights[name].shape)} != {tuple(tensor.shape)}"
             for name, tensor in state.items()
             if name in weights and tuple(weights[name].shape) != tuple(tensor.shape)]
    if missing or wrong:
        raise FinetuneRefused(
            f"package {package.path.name}: its ONNX weights do not fit the network its manifest "
            f"names (missing {missing[:5]}, shapes {wrong[:5]})")
    loaded = {name: torch.from_numpy(np.array(weights[name])).to(tensor.dtype)
              if name in weights else tensor for name, tensor in state.items()}
    model.load_state_dict(loaded)
    return model


def _start_checkpoint(model: torch.nn.Module, config: TrainConfig, path: Path) -> None:
    """A step-0 checkpoint of ``model`` in :mod:`models.train`'s format (fresh optimiser and
    schedule, seeded RNG), so that ``train(resume=True)`` starts the run from the package."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    version, internal, gauss = random.getstate()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": 0,
        "best_dice": -1.0,
        "history": [],
        "rng": {"torch": torch.get_rng_state(),
                "numpy": np.random.default_rng(config.seed).bit_generator.state,
                "python": [version, list(internal), gauss]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


# -- which patients are held back --------------------------------------------------------------
def _patient_draw(key: str) -> float:
    digest = hashlib.sha256(f"holdout:{key}".encode()).hexdigest()
    return int(digest[:12], 16) / float(16 ** 12)


def held_back_patients(keys: Sequence[str], fraction: float = DEFAULT_HOLDOUT) -> set[str]:
    """The patient keys held back: those whose draw (sha256 of the key, in [0, 1)) is below
    ``fraction``, at most ``ceil(fraction * patients)`` of them (the lowest draws), at least one
    when there are two patients or more. A patient whose draw is above ``fraction`` is never
    held back, however many patients are added."""
    unique = sorted(set(keys))
    below = sorted((key for key in unique if _patient_draw(key) < fraction), key=_patient_draw)
    held = set(below[:max(1, math.ceil(fraction * len(unique)))])
    if not held and len(unique) >= 2:
        held = {min(unique, key=_patient_draw)}
    if len(held) == len(unique) and len(unique) >= 2:
        held.discard(max(held, key=_patient_draw))
    return held


def next_version(packages_dir: Path, name: str, base_version: str, site: str) -> str:
    """``<base>+<site>.<n>`` with ``n`` one above any such package already there."""
    base = base_version.split("+", 1)[0]
    pattern = re.compile(rf"^{re.escape(name)}-{re.escape(base)}\+{re.escape(site)}\.(\d+)$")
    taken = [int(match[1]) for child in packages_dir.glob("*")
             if (match := pattern.match(child.name))]
    return f"{base}+{site}.{max(taken, default=0) + 1}"


# -- comparing base and new ---------------------------------------------------------------------
def _scores(segmenter: Segmenter, dataset: SiteDataset, sets: Sequence[KeptSet],
            exclude: set[str]) -> dict[str, list[tuple[float, float | None]]]:
    """structure -> [(Dice, HD95 mm)] of ``segmenter`` on the kept sets' CT (model grid)
    against the approved contours (occupancy >= 1/2), for each set that holds it."""
    scores: dict[str, list[tuple[float, float | None]]] = {o.roi_name: [] for o in ORGANS}
    for kept in sets:
        case = dataset.load(kept, segmenter.manifest.intensity.clip_hu)
        hu = dataset.hu(kept).astype(np.float32)
        predicted = segmenter.predict(hu, kept.spacing_mm)
        for channel, organ in enumerate(ORGANS):
            if not case.known[channel] or organ.roi_name in exclude or case.soft is None:
                continue
            reference = case.soft[channel] >= (SOFT_SCALE + 1) // 2
            mask = predicted[organ.roi_name]
            scores[organ.roi_name].append((dice(mask, reference),
                                           hd95_mm(mask, reference, kept.spacing_mm)))
    return scores


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def compare_on_site(base: Path, new: Path, dataset: SiteDataset, sets: Sequence[KeptSet],
                    exclude: set[str], worse_margin: float, threads: int
                    ) -> dict[str, SiteMetric]:
    """Per structure: base and new package's mean Dice and HD95 on the held-back sets."""
    base_scores = _scores(Segmenter(base, threads=threads), dataset, sets, exclude)
    new_scores = _scores(Segmenter(new, threads=threads), dataset, sets, exclude)
    metrics = {}
    for name, pairs in base_scores.items():
        if not pairs:
            continue
        base_dice = _mean([d for d, _ in pairs])
        new_dice = _mean([d for d, _ in new_scores[name]])
        metrics[name] = SiteMetric(
            base_dice=base_dice, new_dice=new_dice,
            base_hd95_mm=_mean([h for _, h in pairs]),
            new_hd95_mm=_mean([h for _, h in new_scores[name]]),
            n_cases=len(pairs),
            worse=bool(base_dice is not None and new_dice is not None
                       and new_dice < base_dice - worse_margin))
    return metrics


def compare_on_openkbp(base: Path, new: Path, data_dir: Path, limit: int, threads: int,
                       offset: int = 0) -> tuple[dict[str, SiteMetric], str]:
    """Per structure on OpenKBP validation patients ``offset`` to ``offset + limit`` (in
    patient-number order), and a note; empty with the reason when the data is not there."""
    if limit <= 0:
        return {}, "OpenKBP comparison skipped (--openkbp-limit 0)."
    if not (data_dir / "validation").is_dir():
        return {}, f"OpenKBP comparison skipped: no OpenKBP validation data in {data_dir}."
    from rtcontour.models.evaluate import evaluate_package

    results = [evaluate_package(package, data_dir, limit=limit, offset=offset, threads=threads)
               for package in (base, new)]
    metrics = {}
    for name, before in results[0]["per_structure"].items():
        after = results[1]["per_structure"].get(name, {})
        metrics[name] = SiteMetric(base_dice=before.get("dice"), new_dice=after.get("dice"),
                                   base_hd95_mm=before.get("hd95_mm"),
                                   new_hd95_mm=after.get("hd95_mm"),
                                   n_cases=int(before.get("n_cases") or 0))
    return metrics, (f"OpenKBP validation patients: {results[0]['n_cases']} from number "
                     f"{offset + 1} in patient-number order, their OpenKBP references "
                     "(passing models.reference_qa).")


# -- the model card -------------------------------------------------------------------------------
def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(metrics: dict[str, SiteMetric], mark_worse: bool) -> list[str]:
    rows = ["| structure | base Dice | new Dice | change | base HD95 (mm) | new HD95 (mm) | "
            "sets |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, metric in metrics.items():
        change = (None if metric.base_dice is None or metric.new_dice is None
                  else metric.new_dice - metric.base_dice)
        shown = "-" if change is None else f"{change:+.3f}"
        label = name
        if mark_worse and metric.worse:
            shown = f'<span style="color:red">**{shown} worse**</span>'
            label = f'<span style="color:red">**{name}**</span>'
        rows.append(f"| {label} | {_number(metric.base_dice, 3)} | "
                    f"{_number(metric.new_dice, 3)} | {shown} | "
                    f"{_number(metric.base_hd95_mm, 1)} | {_number(metric.new_hd95_mm, 1)} | "
                    f"{metric.n_cases} |")
    return rows


def render_finetune_section(report: FineTuneReport, command: str) -> str:
    """The card's fine-tuning section (Markdown; worse structures in red)."""
    verdict = ("**Recommended**: no structure got worse on the held-back sets."
               if report.recommended else
               '<span style="color:red">**NOT RECOMMENDED**</span>: worse on the held-back '
               f"sets: {', '.join(report.worse_structures)}.")
    lines = [
        f"## Fine-tuned on {report.site}'s approved structure sets",
        "",
        verdict,
        "",
        f"Base package {report.base_package}; {report.steps} training steps on "
        f"{report.n_train_sets} kept sets; {report.n_held_back_sets} sets of "
        f"{len(report.held_back_patients)} patients held back (fixed by patient) and never "
        "trained on. Recipe of the contour campaign: soft targets, spatial (p 0.25) and "
        "intensity augmentation, EMA, 2 deep-supervision heads.",
        "",
        "### Held-back site sets (the clinic's style)",
        "",
        *_table(report.site_metrics, mark_worse=True),
        "",
        "Dice and HD95 on the model grid, against the approved contours (occupancy >= 1/2).",
        "",
        "### OpenKBP validation patients (the general skill kept)",
        "",
    ]
    if report.openkbp_metrics:
        lines += [*_table(report.openkbp_metrics, mark_worse=False), ""]
    lines += [report.openkbp_note, "", "Command:", "", f"    {command}", ""]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------
def _device(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            log.info("fine-tuning on the GPU (%s)", torch.cuda.get_device_name(0))
            return "cuda"
        log.warning("no GPU seen by torch: fine-tuning on the CPU")
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise FinetuneRefused("--device cuda: torch sees no GPU on this machine")
    return requested


def _cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text(encoding="ascii")
    except OSError:
        return False


def finetune(
    base: Path,
    site: str,
    dataset: SiteDataset,
    packages_dir: Path,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    holdout: float = DEFAULT_HOLDOUT,
    min_sets: int = 10,
    exclude: Sequence[str] = (),
    lr: float = 2e-4,
    batch_size: int = 2,
    threads: int = 2,
    device: str = "auto",
    openkbp_dir: Path | None = None,
    openkbp_limit: int = 8,
    openkbp_offset: int = 0,
    worse_margin: float = 0.01,
    run_dir: Path | None = None,
    seed: int = 20261,
    command: str = "rtcontour finetune",
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune package ``base`` on ``dataset``; writes ``<name>-<base>+<site>.<n>`` under
    ``packages_dir`` and returns it with its report (see the module docstring).

    ``steps`` or ``minutes`` is the budget (one of them). Raises :class:`FinetuneRefused`
    with a sentence when a guard refuses the run.
    """
    started = time.monotonic()
    if (steps is None) == (minutes is None):
        raise ValueError("give a budget of steps or of minutes (one of them)")
    if steps is not None and steps < 1 or minutes is not None and minutes <= 0:
        raise ValueError(f"the budget must be positive, not {steps or minutes!r}")
    if not SITE_NAME.match(site):
        raise FinetuneRefused(f"{site!r} is not a site name (lower-case letters, digits, '-')")
    package = load_package(base)
    organ_names = [organ.roi_name for organ in ORGANS]
    excluded = set(exclude)
    unknown_excluded = sorted(excluded - set(organ_names))
    if unknown_excluded:
        raise FinetuneRefused(f"--exclude {', '.join(unknown_excluded)}: not a structure of "
                              f"the model ({', '.join(organ_names)})")
    target = tuple(float(s) for s in package.manifest.target_spacing_mm)
    all_sets = dataset.sets()
    sets = [kept for kept in all_sets if tuple(kept.spacing_mm) == target]
    if len(sets) < len(all_sets):
        log.warning("%d kept set(s) are on another grid than %s mm and are left out",
                    len(all_sets) - len(sets), target)
    counts = {name: sum(1 for kept in sets if name in kept.structures) for name in organ_names}
    short = {name: n for name, n in counts.items() if n < min_sets and name not in excluded}
    if short:
        raise FinetuneRefused(
            "not enough kept structure sets: " + ", ".join(
                f"{name} {n} of {min_sets}" for name, n in short.items())
            + " (keep more with keep_for_training, or --exclude a structure)")
    held_keys = held_back_patients([kept.patient_key for kept in sets], holdout)
    held = [kept for kept in sets if kept.patient_key in held_keys]
    training = [kept for kept in sets if kept.patient_key not in held_keys]
    if not held or not training:
        raise FinetuneRefused(f"{len(sets)} kept set(s) of {len({k.patient_key for k in sets})} "
                              "patient(s): fine-tuning needs patients both to train on and to "
                              "hold back")
    version = next_version(packages_dir, package.manifest.name, package.manifest.version, site)
    final = packages_dir / f"{package.manifest.name}-{version}"
    if final.exists():
        raise FinetuneRefused(f"{final} exists: a package is never overwritten")
    on_device = _device(device)
    budget_steps = steps if steps is not None else 1_000_000
    ema_decay = min(0.999, 1.0 - 10.0 / max(budget_steps if steps is not None else 1000, 20))
    levels = config_from_manifest(package).levels
    config = config_from_manifest(
        package, run=f"finetune-{site}", steps=budget_steps, lr=lr, warmup_steps=min(
            20, max(1, budget_steps // 10)), batch_size=batch_size, soft_targets=True,
        spatial_aug_p=0.25, intensity_aug=True, ema_decay=ema_decay,
        deep_supervision=min(2, max(0, levels - 2)),  # the campaign's 2 where the net has room
        val_every=10 ** 9, val_cases=0, threads=threads, seed=seed,
        bf16=on_device == "cuda" or _cpu_has_bf16(), reference_qa=True,
        train_limit=package.manifest.training_data.n_train_cases, command=[command])
    model = network_from_package(package, config)
    train_cases = [dataset.load(kept, config.hu_clip) for kept in training]
    exclude_channels = [i for i, name in enumerate(organ_names) if name in excluded]
    for case in train_cases:
        case.known[exclude_channels] = False
    own_run_dir = run_dir is None
    work = Path(tempfile.mkdtemp(prefix="rtcontour-finetune-")) if run_dir is None else run_dir
    try:
        work.mkdir(parents=True, exist_ok=True)
        _start_checkpoint(model, config, work / "last.pt")
        log.info("fine-tuning %s on %d kept sets (%d held back, %d patients) for %s on %s",
                 package.path.name, len(training), len(held), len(held_keys),
                 f"{steps} steps" if steps is not None else f"{minutes:g} minutes", on_device)
        payload = train(config, train_cases, [], work, resume=True, device=on_device,
                        time_budget_s=None if minutes is None else minutes * 60.0,
                        on_step=on_step)
        from rtcontour.models.export import write_package

        staging = work / "package"
        shutil.rmtree(staging, ignore_errors=True)
        folder = write_package(work / "last.pt", staging, package.manifest.name, version,
                               command)
        site_metrics = compare_on_site(package.path, folder, dataset, held, excluded,
                                       worse_margin, threads)
        openkbp_metrics, note = compare_on_openkbp(
            package.path, folder, openkbp_dir or default_data_dir(), openkbp_limit, threads,
            openkbp_offset)
        worse = [name for name, metric in site_metrics.items() if metric.worse]
        report = FineTuneReport(
            base_package=f"{package.manifest.name}-{package.manifest.version}", site=site,
            recommended=not worse, worse_structures=worse, n_train_sets=len(training),
            n_held_back_sets=len(held), held_back_patients=sorted(held_keys),
            steps=int(payload["step"]), site_metrics=site_metrics,
            openkbp_metrics=openkbp_metrics, openkbp_note=note)
        _finish_package(folder, package, report, command, len(training))
        if final.exists():
            raise FinetuneRefused(f"{final} appeared meanwhile: a package is never overwritten")
        os.rename(folder, final)
    finally:
        if own_run_dir:
            shutil.rmtree(work, ignore_errors=True)
    load_package(final)
    log.info("wrote %s (%s)", final, "recommended" if report.recommended else
             f"NOT recommended: worse {', '.join(worse)}")
    return FinetuneResult(final, report, time.monotonic() - started)


def _finish_package(folder: Path, base: ModelPackage, report: FineTuneReport, command: str,
                    n_train: int) -> None:
    """The manifest's fine-tuning report, the base's validation figures and data lineage, and
    the card's fine-tuning section (first, with the verdict)."""
    manifest = load_package(folder).manifest
    description = (f"{base.manifest.training_data.description}; then fine-tuned on {n_train} "
                   f"structure sets approved at {report.site} (site data set, approved "
                   "contours as soft targets, organs not drawn masked as unknown)")
    manifest = manifest.model_copy(update={
        "finetune": report,
        "training_data": TrainingData(
            description=description, citation=base.manifest.training_data.citation,
            n_train_cases=base.manifest.training_data.n_train_cases + n_train,
            n_validation_cases=base.manifest.training_data.n_validation_cases),
        "training_command": [*base.manifest.training_command, command],
        # what QA alerts expect of each structure at this site: the held-back sets' figures
        "validation_metrics": {
            name: ValidationMetric(dice=metric.new_dice, hd95_mm=metric.new_hd95_mm,
                                   n_cases=metric.n_cases)
            for name, metric in report.site_metrics.items() if metric.new_dice is not None},
    })
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n",
                                        encoding="utf-8")
    card = (folder / CARD_NAME).read_text(encoding="utf-8")
    # the export's empty OpenKBP table: the figures are in the fine-tuning section
    card = re.sub(r"## Validation metrics \(OpenKBP validation split\)\n.*?(?=\n## )",
                  "## Validation metrics\nSee the fine-tuning section above: base and new "
                  "model on the held-back site patients and on OpenKBP validation patients.\n",
                  card, count=1, flags=re.DOTALL)
    card = re.sub(r"## Data\n.*?(?=\n\nCitation:)",
                  lambda _: f"## Data\n{description}. The base model's OpenKBP figures are "
                  "in its own card.", card, count=1, flags=re.DOTALL)
    head, _, rest = card.partition("\n")
    (folder / CARD_NAME).write_text(
        f"{head}\n\n{render_finetune_section(report, command)}\n{rest}", encoding="utf-8")
    (folder / "finetune.json").write_text(report.model_dump_json(indent=2) + "\n",
                                          encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``rtcontour finetune``)."""
    from rtcontour.common.settings import Settings
    from rtcontour.models.package import default_packages_root
    from rtcontour.models.registry import resolve_package_path

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.model_validate({})  # from the environment (RTCONTOUR_*)
    packages_dir = args.packages_dir or settings.model_packages_dir or default_packages_root()
    base = Path(args.package)
    if not (base / MANIFEST_NAME).is_file():
        base = resolve_package_path(settings.model_copy(
            update={"model_packages_dir": packages_dir, "model_package": None}), args.package)
    dataset = SiteDataset(args.site_dataset or settings.effective_site_dataset_dir)
    try:
        result = finetune(
            base, args.site, dataset, packages_dir, steps=args.steps, minutes=args.minutes,
            holdout=args.holdout, min_sets=args.min_sets or settings.finetune_min_sets,
            exclude=args.exclude, lr=args.lr, batch_size=args.batch_size, threads=args.threads,
            device=args.device, openkbp_dir=args.openkbp_dir, openkbp_limit=args.openkbp_limit,
            openkbp_offset=args.openkbp_offset,
            worse_margin=args.worse_margin, run_dir=args.run_dir, seed=args.seed,
            command=" ".join(["rtcontour finetune", *argv]))
    except FinetuneRefused as error:
        print(f"rtcontour finetune: refused: {error}", file=sys.stderr)  # noqa: T201
        return 2
    print(json.dumps({"package": str(result.package),  # noqa: T201
                      **result.report.model_dump(mode="json")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
