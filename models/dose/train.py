"""Training of the dose model on OpenKBP (``python -m rtcontour.models.dose.train``).

Each step sees whole patients on the model grid (:mod:`models.dose.features`), left/right
mirrored at random. Loss = mean absolute error in Gy inside the possible-dose mask (weighted
by its occupancy of each model voxel, so the coarse loss approximates the challenge's MAE on
the CT grid) + ``moment_weight`` x the moment loss of Jhanwar et al. ("Domain knowledge driven
3D dose prediction using moment-based loss function", Phys. Med. Biol. 67:185017, 2022): the
squared difference, per structure (7 OARs, 3 PTVs), of the generalised means
``(mean d^p)^(1/p)`` for p in ``moments`` (1 = mean dose, 2, and 10, close to the maximum),
summed over p and averaged over the structures a patient has. It is a differentiable stand-in
for the DVH points the OpenKBP DVH score compares. The targets' coverage (issue 21): the PTVs'
moment differences count ``ptv_weight`` times, and ``ptv_cold_moment`` (a negative p, e.g. -8)
adds a generalised mean that follows the PTV's cold end (D95/D99) rather than its mean, so
that the blur of the mean absolute error cannot pull the PTV edges down unseen.

Augmentation (``augment_p``): besides the left/right mirror, a random rotation of up to
``rotation_deg`` about the long (slice) axis and a sub-voxel shift of up to ``shift_voxels``
of the sampling grid on each axis, applied alike to inputs, dose and structures (trilinear).

Checkpoints (``runs/<run>/last.pt``, ``best.pt``) hold tensors and plain types only and are
loaded with ``weights_only=True``; resume is exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rtcontour.models.dose.data import DoseCase, load_dose_split
from rtcontour.models.dose.features import DOSE_SPACING_MM, MIRROR_CHANNEL_SWAPS
from rtcontour.models.dose.network import DoseUNet
from rtcontour.models.run_files import atomic_save

__all__ = [
    "DoseTrainConfig",
    "build_model",
    "dose_loss",
    "generalised_means",
    "augment_batch",
    "DoseSampler",
    "pad_to_multiple",
    "train",
    "load_checkpoint",
    "main",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DoseTrainConfig:
    """Everything that defines a dose training run (stored in every checkpoint)."""

    run: str = "dose-1"
    base_channels: int = 12
    levels: int = 4
    max_channels: int = 128
    steps: int = 1600
    # Batch 2: with one sample, PyTorch's CPU convolution takes its slow (non-oneDNN) path
    # for the small deep levels (N*C*D*H <= 20480), and a step costs more per patient.
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    moment_weight: float = 0.01
    moments: tuple[float, ...] = (1.0, 2.0, 10.0)
    val_every: int = 200
    val_cases: int = 8
    checkpoint_minutes: float = 3.0
    seed: int = 20261
    threads: int = 1
    channels_last: bool = True
    target_spacing_mm: tuple[float, float, float] = DOSE_SPACING_MM
    data_dir: str = ""
    train_limit: int = 0
    # Recipe of issue 21 (off by default: the recipe of the checkpoints made before).
    augment_p: float = 0.0
    rotation_deg: float = 10.0
    shift_voxels: float = 0.5
    ptv_weight: float = 1.0
    ptv_cold_moment: float = 0.0
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DoseTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) and k != "command" else v
                                  for k, v in values.items() if k in known}
        return cls(**kwargs)


def build_model(config: DoseTrainConfig) -> DoseUNet:
    return DoseUNet(base_channels=config.base_channels, levels=config.levels,
                    max_channels=config.max_channels)


def generalised_means(dose_gy: torch.Tensor, occupancy: torch.Tensor,
                      moments: Sequence[float], scale_gy: float = 70.0) -> torch.Tensor:
    """(B, S, len(moments)) ``(sum w d^p / sum w)^(1/p)`` in Gy for dose (B, D, H, W) >= 0 and
    structure weights ``occupancy`` (B, S, D, H, W); computed on d / ``scale_gy`` so that
    p = 10 stays in float32 range. A negative p follows the cold end; the dose is then taken
    as at least 5 % of ``scale_gy`` so that an empty prediction stays finite."""
    weights = occupancy / occupancy.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1e-6)
    floor = 0.05 if min(moments) < 0 else 0.0
    relative = (dose_gy.clamp(min=0.0) / scale_gy).clamp(min=floor).unsqueeze(1) + 1e-6
    values = [((weights * relative ** p).sum(dim=(2, 3, 4)) + 1e-12) ** (1.0 / p)
              for p in moments]
    return torch.stack(values, dim=-1) * scale_gy


def dose_loss(
    predicted_gy: torch.Tensor,
    target_gy: torch.Tensor,
    mask_weight: torch.Tensor,
    structures: torch.Tensor,
    moments: Sequence[float] = DoseTrainConfig.moments,
    moment_weight: float = DoseTrainConfig.moment_weight,
    ptv_weight: float = 1.0,
    ptv_cold_moment: float = 0.0,
    n_ptvs: int = 3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MAE in the possible-dose mask + ``moment_weight`` x moment loss (see module doc).

    Args:
        predicted_gy, target_gy: (B, D, H, W) dose in Gy.
        mask_weight: (B, D, H, W) possible-dose occupancy in [0, 1] (0 in padding).
        structures: (B, S, D, H, W) structure occupancies, the last ``n_ptvs`` the PTVs;
            structures with less than one voxel of occupancy in a sample are left out of the
            moment term.
        ptv_weight: weight of the PTVs' rows of the moment term (the OARs' is 1).
        ptv_cold_moment: a negative p added to the PTVs' moments (0: none).
    """
    weight_sum = mask_weight.sum().clamp(min=1e-6)
    mae = ((predicted_gy - target_gy).abs() * mask_weight).sum() / weight_sum
    present = (structures.sum(dim=(2, 3, 4)) >= 1.0).float()
    rows = torch.ones(structures.shape[1], dtype=mae.dtype, device=mae.device)
    rows[structures.shape[1] - n_ptvs:] = ptv_weight
    cold = torch.zeros((), dtype=mae.dtype, device=mae.device)
    if moment_weight > 0 and float(present.sum()) > 0:
        difference = (generalised_means(predicted_gy, structures, moments)
                      - generalised_means(target_gy, structures, moments)) ** 2
        per_structure = difference.sum(dim=-1)
        if ptv_cold_moment < 0 and n_ptvs:
            ptvs = structures[:, -n_ptvs:]
            cold_difference = (generalised_means(predicted_gy, ptvs, [ptv_cold_moment])
                               - generalised_means(target_gy, ptvs, [ptv_cold_moment]))[..., 0]
            cold_present = present[:, -n_ptvs:]
            per_structure = torch.cat([per_structure[:, :-n_ptvs],
                                       per_structure[:, -n_ptvs:] + cold_difference ** 2], dim=1)
            cold = ((cold_difference ** 2) * cold_present).sum() / cold_present.sum().clamp(1.0)
        moment = (per_structure * present * rows).sum() / (present * rows).sum()
    else:
        moment = torch.zeros((), dtype=mae.dtype)
    total = mae + moment_weight * moment
    return total, {"mae_gy": float(mae.detach()), "moment_gy2": float(moment.detach()),
                   "ptv_cold_gy2": float(cold.detach())}


def augment_batch(
    inputs: torch.Tensor, target: torch.Tensor, structures: torch.Tensor,
    rng: np.random.Generator, probability: float, rotation_deg: float, shift_voxels: float,
    spacing_mm: Sequence[float] = DOSE_SPACING_MM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate each sample (with ``probability``) about the slice axis by up to
    ``rotation_deg`` and shift its sampling grid by up to ``shift_voxels`` on each axis;
    inputs (B, C, D, H, W), target (B, D, H, W) and structures (B, S, D, H, W) alike.
    Outside the volume: the edge values (the padding: CT -1, everything else 0)."""
    if probability <= 0.0:
        return inputs, target, structures
    out_inputs, out_target, out_structures = [], [], []
    depth, height, width = inputs.shape[2:]
    for index in range(inputs.shape[0]):
        x, y, s = inputs[index:index + 1], target[index:index + 1], structures[index:index + 1]
        if rng.random() < probability:
            angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
            shift = rng.uniform(-shift_voxels, shift_voxels, size=3)  # slices, rows, columns
            # normalised coordinates (x = columns, y = rows, z = slices) to mm and back
            half_mm = np.array([width * spacing_mm[2], height * spacing_mm[1],
                                depth * spacing_mm[0]]) / 2.0
            rotation = np.eye(3)
            rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
            matrix = np.diag(1.0 / half_mm) @ rotation @ np.diag(half_mm)
            offset = 2.0 * shift[::-1] / np.array([width, height, depth])
            theta = torch.as_tensor(np.concatenate([matrix, offset[:, None]], axis=1)[None],
                                    dtype=torch.float32)
            grid = torch.nn.functional.affine_grid(theta, [1, 1, depth, height, width],
                                                   align_corners=False)

            def sample(volume: torch.Tensor, grid: torch.Tensor = grid) -> torch.Tensor:
                return torch.nn.functional.grid_sample(volume, grid, mode="bilinear",
                                                       padding_mode="border",
                                                       align_corners=False)

            x, y, s = sample(x), sample(y[:, None])[:, 0], sample(s)
        out_inputs.append(x)
        out_target.append(y)
        out_structures.append(s)
    return torch.cat(out_inputs), torch.cat(out_target), torch.cat(out_structures)


def pad_to_multiple(array: np.ndarray, divisor: int, shape: Sequence[int] | None = None,
                    value: float = 0.0) -> np.ndarray:
    """Pad the last three axes at their far end to ``shape`` (default: the next multiples of
    ``divisor``)."""
    spatial = array.shape[-3:]
    wanted = shape if shape is not None else [-(-n // divisor) * divisor for n in spatial]
    pads = [(0, 0)] * (array.ndim - 3) + [(0, w - n) for n, w in zip(spatial, wanted,
                                                                     strict=True)]
    return np.pad(array, pads, constant_values=value)


def mirror_inputs(inputs: np.ndarray) -> np.ndarray:
    """Patient left/right mirror of (C, D, H, W) inputs with the paired OAR channels swapped."""
    order = list(range(inputs.shape[0]))
    for left, right in MIRROR_CHANNEL_SWAPS:
        order[left], order[right] = order[right], order[left]
    return np.ascontiguousarray(np.flip(inputs, axis=-1)[order])


class DoseSampler:
    """Draws training batches of whole patients; all randomness from one numpy Generator."""

    def __init__(self, cases: Sequence[DoseCase], divisor: int, rng: np.random.Generator) -> None:
        if not cases:
            raise ValueError("cases must not be empty")
        self.cases = list(cases)
        self.divisor = divisor
        self.rng = rng

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
        """(B, C, D, H, W) inputs, (B, D, H, W) target Gy, (B, D, H, W) mask weight,
        (B, 10, D, H, W) structure occupancies (7 OARs then 3 PTVs), padded together."""
        chosen = [self.cases[int(self.rng.integers(len(self.cases)))] for _ in range(batch_size)]
        shape = [-(-max(c.shape[a] for c in chosen) // self.divisor) * self.divisor
                 for a in range(3)]
        inputs, targets, structures = [], [], []
        for case in chosen:
            x = case.inputs.astype(np.float32)
            y = case.target_gy.astype(np.float32)
            s = np.concatenate([x[1:8], case.ptv_occupancy.astype(np.float32)])
            if self.rng.random() < 0.5:
                x = mirror_inputs(x)
                y = np.ascontiguousarray(np.flip(y, axis=-1))
                s = mirror_inputs(np.concatenate([x[:1] * 0, s]))[1:]
            background = np.zeros((x.shape[0], 1, 1, 1), dtype=np.float32)
            background[0] = -1.0
            padded = pad_to_multiple(x - background, self.divisor, shape) + background
            inputs.append(padded)
            targets.append(pad_to_multiple(y, self.divisor, shape))
            structures.append(pad_to_multiple(s, self.divisor, shape))
        x_batch = torch.from_numpy(np.stack(inputs))
        return (x_batch, torch.from_numpy(np.stack(targets)),
                x_batch[:, -1].clamp(min=0.0).contiguous(),
                torch.from_numpy(np.stack(structures)))


@torch.no_grad()
def predict_case(model: nn.Module, case: DoseCase, divisor: int) -> np.ndarray:
    """Model-grid dose (Gy, ``case.shape``) of one case."""
    background = np.zeros((case.inputs.shape[0], 1, 1, 1), dtype=np.float32)
    background[0] = -1.0
    x = pad_to_multiple(case.inputs.astype(np.float32) - background, divisor) + background
    out = model(torch.from_numpy(x)[None])[0, 0].numpy()
    return out[tuple(slice(0, n) for n in case.shape)]


def validate(model: nn.Module, cases: Sequence[DoseCase], divisor: int) -> float:
    """Mean over ``cases`` of the occupancy-weighted MAE (Gy) on the model grid."""
    model.eval()
    scores = []
    for case in cases:
        predicted = predict_case(model, case, divisor)
        weight = np.clip(case.inputs[-1].astype(np.float32), 0.0, None)
        scores.append(float((np.abs(predicted - case.target_gy) * weight).sum() / weight.sum()))
    model.train()
    return float(np.mean(scores))


def _lr_lambda(config: DoseTrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        return warm * (1.0 - min(1.0, step / max(1, config.steps))) ** 0.9

    return factor


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` (tensors and plain types only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("kind") != "dose":
        raise ValueError(f"{path} is not a format-{CHECKPOINT_FORMAT} rtcontour dose checkpoint")
    return payload  # type: ignore[no-any-return]


def train(
    config: DoseTrainConfig,
    train_cases: Sequence[DoseCase],
    val_cases: Sequence[DoseCase],
    run_dir: Path,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) training; returns the final checkpoint payload. ``stop_after``: stop
    (with a checkpoint) after that global step; the LR schedule still follows ``steps``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_model(config)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    step, best_mae, history = 0, float("inf"), []
    if resume:
        payload = load_checkpoint(last_path)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        step, best_mae = int(payload["step"]), float(payload["best_mae_gy"])
        history = list(payload["history"])
        torch.set_rng_state(payload["rng"]["torch"])
        rng.bit_generator.state = payload["rng"]["numpy"]
        log.info("resumed %s at step %d (best validation MAE %.3f Gy)", last_path, step,
                 best_mae)
    sampler = DoseSampler(train_cases, model.divisor, rng)
    log.info("dose model: %d parameters; %d train / %d val cases; %d steps of batch %d",
             sum(p.numel() for p in model.parameters()), len(train_cases), len(val_cases),
             config.steps, config.batch_size)

    def payload_now(current_step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "dose",
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": current_step,
            "best_mae_gy": best_mae,
            "history": history,
            "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state},
        }

    model.train()
    last_save = tick = time.monotonic()
    window: list[tuple[float, float, float]] = []
    final_step = config.steps if stop_after is None else min(config.steps, stop_after)
    while step < final_step:
        inputs, target, weight, structures = sampler.batch(config.batch_size)
        if config.augment_p > 0.0:
            inputs, target, structures = augment_batch(
                inputs, target, structures, rng, config.augment_p, config.rotation_deg,
                config.shift_voxels, config.target_spacing_mm)
            weight = inputs[:, -1].clamp(min=0.0).contiguous()
        predicted = model(inputs.to(memory_format=memory_format))[:, 0]
        loss, parts = dose_loss(predicted, target, weight, structures, config.moments,
                                config.moment_weight, config.ptv_weight,
                                config.ptv_cold_moment)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        window.append((float(loss.detach()), parts["mae_gy"], parts["moment_gy2"]))
        if step % 25 == 0 or step == final_step:
            mean = np.mean(window, axis=0)
            log.info("step %d/%d loss %.3f (MAE %.3f Gy, moment %.2f Gy^2) lr %.2e %.3f s/step",
                     step, config.steps, mean[0], mean[1], mean[2], scheduler.get_last_lr()[0],
                     (time.monotonic() - tick) / len(window))
            window, tick = [], time.monotonic()
        is_val = bool(val_cases) and (step % config.val_every == 0 or step == config.steps)
        if is_val:
            started = time.monotonic()
            mae = validate(model, val_cases, model.divisor)
            history.append({"step": step, "val_mae_gy": mae})
            log.info("validation step %d: model-grid MAE %.3f Gy over %d cases (%.0f s)", step,
                     mae, len(val_cases), time.monotonic() - started)
            if mae < best_mae:
                best_mae = mae
                atomic_save(payload_now(step), best_path)
                log.info("new best checkpoint %s (MAE %.3f Gy)", best_path, best_mae)
            tick = time.monotonic()
        if is_val or time.monotonic() - last_save > 60 * config.checkpoint_minutes:
            atomic_save(payload_now(step), last_path)
            last_save = time.monotonic()
    final = payload_now(step)
    atomic_save(final, last_path)
    log.info("stopped at step %d; checkpoint %s", step, last_path)
    return final


def build_parser() -> argparse.ArgumentParser:
    defaults = DoseTrainConfig()
    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.dose.train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=defaults.run, help="run name (folder under runs/)")
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="OpenKBP folder with train/ and validation/")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "cache")
    parser.add_argument("--resume", action="store_true", help="continue from runs/<run>/last.pt")
    parser.add_argument("--base-channels", type=int, default=defaults.base_channels)
    parser.add_argument("--levels", type=int, default=defaults.levels)
    parser.add_argument("--max-channels", type=int, default=defaults.max_channels)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--moment-weight", type=float, default=defaults.moment_weight)
    parser.add_argument("--val-every", type=int, default=defaults.val_every)
    parser.add_argument("--val-cases", type=int, default=defaults.val_cases)
    parser.add_argument("--checkpoint-minutes", type=float, default=defaults.checkpoint_minutes)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--train-limit", type=int, default=0, help="use only N train cases")
    parser.add_argument("--stop-after", type=int, default=None)
    recipe = parser.add_argument_group("recipe (issue 21; fixed for a run, refused on --resume)")
    recipe.add_argument("--augment", type=float, default=defaults.augment_p, metavar="P",
                        help="probability per sample of a rotation about the long axis and a "
                             "sub-voxel shift (0: mirror only)")
    recipe.add_argument("--rotation-deg", type=float, default=defaults.rotation_deg)
    recipe.add_argument("--shift-voxels", type=float, default=defaults.shift_voxels)
    recipe.add_argument("--ptv-weight", type=float, default=defaults.ptv_weight,
                        help="weight of the PTVs in the moment term (OARs: 1)")
    recipe.add_argument("--ptv-cold-moment", type=float, default=defaults.ptv_cold_moment,
                        metavar="P", help="negative p of a PTV cold-end generalised mean added "
                                          "to the moment term (0: none; e.g. -8)")
    return parser


RECIPE_FLAGS = {"--augment": "augment_p", "--rotation-deg": "rotation_deg",
                "--shift-voxels": "shift_voxels", "--ptv-weight": "ptv_weight",
                "--ptv-cold-moment": "ptv_cold_moment", "--moment-weight": "moment_weight",
                "--batch": "batch_size", "--lr": "lr"}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; logs to stderr and ``runs/<run>/train.log``."""
    from rtcontour.models.data import default_data_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    run_dir = args.runs_dir / args.run
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(run_dir /
                                                                               "train.log")])
    data_dir = args.data_dir or default_data_dir()
    command = " ".join(["python -m rtcontour.models.dose.train", *argv])
    if args.resume:
        config = DoseTrainConfig.from_dict(load_checkpoint(run_dir / "last.pt")["config"])
        if "--steps" in argv and args.steps != config.steps:
            log.warning("changing total steps from %d to %d on resume: the LR schedule "
                        "differs from an uninterrupted run", config.steps, args.steps)
            config.steps = args.steps
        given = {arg.split("=")[0] for arg in argv}
        changed = sorted(flag for flag, name in RECIPE_FLAGS.items()
                         if flag in given and getattr(args, name if flag not in
                                                      ("--augment", "--batch") else
                                                      {"--augment": "augment",
                                                       "--batch": "batch"}[flag])
                         != getattr(config, name))
        if changed:
            raise SystemExit(f"python -m rtcontour.models.dose.train: {', '.join(changed)} "
                             "differ from the checkpoint's recipe; a run keeps its recipe")
        if "--threads" in given:  # speed only
            config.threads = args.threads
        config.command = config.command + [command]
    else:
        config = DoseTrainConfig(
            run=args.run, base_channels=args.base_channels, levels=args.levels,
            max_channels=args.max_channels, steps=args.steps, batch_size=args.batch,
            lr=args.lr, moment_weight=args.moment_weight, val_every=args.val_every,
            val_cases=args.val_cases, checkpoint_minutes=args.checkpoint_minutes,
            seed=args.seed, threads=args.threads, data_dir=str(data_dir),
            train_limit=args.train_limit, command=[command], augment_p=args.augment,
            rotation_deg=args.rotation_deg, shift_voxels=args.shift_voxels,
            ptv_weight=args.ptv_weight, ptv_cold_moment=args.ptv_cold_moment,
        )
    torch.set_num_threads(config.threads)
    train_cases = load_dose_split(data_dir, "train", args.cache_dir, config.target_spacing_mm,
                                  limit=config.train_limit or None)
    val_cases = load_dose_split(data_dir, "validation", args.cache_dir,
                                config.target_spacing_mm, limit=config.val_cases)
    final = train(config, train_cases, val_cases, run_dir, resume=args.resume,
                  stop_after=args.stop_after)
    log.info("finished at step %d; best validation model-grid MAE %.3f Gy", final["step"],
             final["best_mae_gy"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
