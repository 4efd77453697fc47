"""Training of the OAR residual U-Net on OpenKBP (``rtcontour train``).

Loss: BCE + soft Dice per structure, both masked for structures a patient lacks
(``rois_present``); Dice only on (sample, structure) pairs whose patch holds the structure,
because soft Dice on empty patches drives thin structures to zero everywhere. Patches are
centred on a random voxel of a random present structure (small ones favoured) with
probability ``foreground_fraction``. Checkpoints (``runs/<run>/last.pt``, ``best.pt``) hold
tensors and plain types only and are loaded with ``weights_only=True``; resume is exact.

Recipe options, all off by default (so checkpoints made before them resume unchanged): spatial
and intensity augmentation on the batch (:mod:`models.augment`), an exponential moving average
of the weights that validation and export use (:mod:`models.ema`), and deep supervision
(auxiliary heads on the decoder, training only; the exported network has one output).

What a run is defined by (:class:`TrainConfig`, re-exported here) and the command's options
(:mod:`models.train_cli`) need no torch; this module does.
"""

from __future__ import annotations

import logging
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from rtcontour.models.augment import (
    IntensityAugmentation,
    crop_size,
    intensity_augment,
    spatial_augment,
)
from rtcontour.models.data import SOFT_SCALE, CaseArrays, default_data_dir, load_split
from rtcontour.models.ema import ModelEMA
from rtcontour.models.inference import gaussian_importance, symmetric_window_starts
from rtcontour.models.labels import LR_SWAP_PAIRS, ORGANS
from rtcontour.models.run_files import atomic_save
from rtcontour.models.train_cli import build_parser, recipe_changes
from rtcontour.models.train_config import TrainConfig
from rtcontour.models.unet import ResidualUNet3D, deep_residual_unet

__all__ = [
    "TrainConfig",
    "build_model",
    "deep_supervision_loss",
    "masked_dice_bce_loss",
    "mirror_left_right",
    "PatchSampler",
    "sliding_window_logits",
    "train",
    "load_checkpoint",
    "main",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def build_model(config: TrainConfig) -> ResidualUNet3D:
    """The network described by ``config`` (``arch`` is ``unet`` or ``deep``)."""
    if config.arch == "unet":
        return ResidualUNet3D(1, len(ORGANS), config.base_channels, config.levels,
                              max_channels=config.max_channels,
                              deep_supervision=config.deep_supervision)
    if config.arch == "deep":
        return deep_residual_unet(1, len(ORGANS), config.base_channels,
                                  deep_supervision=config.deep_supervision)
    raise ValueError(f"arch must be 'unet' or 'deep', got {config.arch!r}")


def masked_dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    known: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + soft Dice, masked per (sample, structure).

    Args:
        logits: (B, C, D, H, W) raw outputs.
        target: (B, C, D, H, W) {0, 1}, or soft targets in [0, 1] (occupancy).
        known: (B, C) bool, structure contoured for that patient.
        pos_weight: optional (C,) BCE weight of positive voxels per channel.

    BCE averages over known pairs; Dice averages over known pairs whose patch holds the
    structure. Unknown pairs contribute no gradient.
    """
    logits = logits.float()
    target = target.float()
    known_f = known.float()
    spatial = tuple(range(2, logits.ndim))
    weight = None if pos_weight is None else pos_weight.view(1, -1, *([1] * len(spatial)))
    bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                                 pos_weight=weight)
    bce = bce_map.mean(dim=spatial)
    n_known = known_f.sum()
    bce_loss = (bce * known_f).sum() / n_known.clamp(min=1.0)
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum(dim=spatial)
    denominator = probs.sum(dim=spatial) + target.sum(dim=spatial)
    dice = (2.0 * intersection + 1.0) / (denominator + 1.0)
    eligible = known_f * (target.sum(dim=spatial) > 0).float()
    n_eligible = eligible.sum()
    dice_loss = ((1.0 - dice) * eligible).sum() / n_eligible.clamp(min=1.0)
    total = bce_loss + dice_loss
    return total, {"bce": float(bce_loss.detach()), "dice_loss": float(dice_loss.detach())}


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    known: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    soft: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`masked_dice_bce_loss` over the outputs of ``ResidualUNet3D.forward_deep``
    (full resolution first), weighted 1, 1/2, 1/4, ... and normalised to sum 1 (nnU-Net);
    the target is downsampled to each output by nearest neighbour, or with ``soft`` by the
    average over each coarse voxel (its occupancy). ``parts`` are those of the
    full-resolution output."""
    weights = [0.5 ** level for level in range(len(outputs))]
    total_weight = sum(weights)
    total = torch.zeros((), device=target.device)
    parts: dict[str, float] = {}
    for level, (output, weight) in enumerate(zip(outputs, weights, strict=True)):
        level_target = target if level == 0 else F.interpolate(
            target, size=list(output.shape[2:]), mode="area" if soft else "nearest")
        loss, level_parts = masked_dice_bce_loss(output, level_target, known, pos_weight)
        total = total + loss * (weight / total_weight)
        if level == 0:
            parts = level_parts
    return total, parts


def mirror_left_right(array: np.ndarray, channel_axis: int | None = 0) -> np.ndarray:
    """Mirror patient left/right (last axis, canonical columns R->L).

    If ``channel_axis`` is given, the Parotid_L/Parotid_R channels are swapped so that the
    labels still name the correct side.
    """
    mirrored = np.flip(array, axis=-1)
    if channel_axis is not None:
        order = list(range(array.shape[channel_axis]))
        for left, right in LR_SWAP_PAIRS:
            order[left], order[right] = order[right], order[left]
        mirrored = np.take(mirrored, order, axis=channel_axis)
    return np.ascontiguousarray(mirrored)


class PatchSampler:
    """Draws (image, target, known) training batches from in-memory cases.

    All randomness comes from one ``numpy.random.Generator`` (state saved in checkpoints).
    With ``crop_size`` (each axis >= the patch, the difference even) every item is the larger
    crop centred on the drawn patch window (outside the volume: image -1, no labels), for
    :func:`models.augment.spatial_augment` to cut the patch from.
    """

    def __init__(
        self,
        cases: Sequence[CaseArrays],
        patch_size: Sequence[int],
        foreground_fraction: float,
        rng: np.random.Generator,
        structure_weights: Sequence[float] = TrainConfig.structure_weights,
        crop_size: Sequence[int] | None = None,
    ) -> None:
        if not cases:
            raise ValueError("cases must not be empty")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.patch = tuple(int(p) for p in patch_size)
        self.crop = self.patch if crop_size is None else tuple(int(c) for c in crop_size)
        if len(self.crop) != 3 or any(
                c < p or (c - p) % 2 for c, p in zip(self.crop, self.patch, strict=True)):
            raise ValueError(f"crop_size must be >= the patch {self.patch} on each axis with an "
                             f"even difference, got {crop_size!r}")
        self.foreground_fraction = foreground_fraction
        self.rng = rng
        if len(structure_weights) != len(ORGANS) or min(structure_weights) <= 0:
            raise ValueError(f"structure_weights must be {len(ORGANS)} positive numbers, "
                             f"got {structure_weights!r}")
        self.structure_weights = np.asarray(structure_weights, dtype=np.float64)
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.soft: list[np.ndarray | None] = []
        self.known: list[np.ndarray] = []
        self.foreground: list[list[np.ndarray]] = []
        for case in cases:
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch, case.image.shape, strict=True)]
            image = np.pad(case.image, pad, constant_values=-1.0)
            labels = np.pad(case.labels, pad)
            self.images.append(image)
            self.labels.append(labels)
            self.soft.append(None if case.soft is None else np.pad(case.soft, [(0, 0), *pad]))
            self.known.append(case.known.astype(bool))
            self.foreground.append(
                [np.flatnonzero((labels >> c) & 1).astype(np.int64) for c in range(len(ORGANS))]
            )

    def _one(self, rng: np.random.Generator | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng if rng is None else rng
        index = int(rng.integers(len(self.images)))
        image, labels, known = self.images[index], self.labels[index], self.known[index]
        shape = image.shape
        present = [c for c in range(len(ORGANS)) if known[c] and self.foreground[index][c].size]
        if present and rng.random() < self.foreground_fraction:
            weights = self.structure_weights[present] / self.structure_weights[present].sum()
            channel = present[int(rng.choice(len(present), p=weights))]
            voxels = self.foreground[index][channel]
            centre = np.unravel_index(int(voxels[rng.integers(voxels.size)]), shape)
            start = [
                int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                for c, p, s in zip(centre, self.patch, shape, strict=True)
            ]
        else:
            start = [int(rng.integers(0, s - p + 1))
                     for p, s in zip(self.patch, shape, strict=True)]
        if self.crop == self.patch:
            window = tuple(slice(a, a + p) for a, p in zip(start, self.patch, strict=True))
            patch_image = image[window].astype(np.float32)[None]
            bits = labels[window]
            soft = (None if self.soft[index] is None
                    else self.soft[index][(slice(None), *window)])  # type: ignore[index]
        else:
            crop_start = [a - (c - p) // 2 for a, c, p in zip(start, self.crop, self.patch,
                                                                strict=True)]
            patch_image = _padded_window(image, crop_start, self.crop, -1.0).astype(
                np.float32)[None]
            bits = _padded_window(labels, crop_start, self.crop, 0)
            soft_case = self.soft[index]
            soft = (None if soft_case is None else np.stack(
                [_padded_window(channel, crop_start, self.crop, 0) for channel in soft_case]))
        if soft is None:
            target = np.stack([(bits >> c) & 1 for c in range(len(ORGANS))]).astype(np.float32)
        else:
            target = soft.astype(np.float32) * np.float32(1.0 / SOFT_SCALE)
        known_row = known.copy()
        if rng.random() < 0.5:
            patch_image = mirror_left_right(patch_image, channel_axis=None)
            target = mirror_left_right(target, channel_axis=0)
            known_row = known_row[[self._swap_index(c) for c in range(len(ORGANS))]]
        scale = rng.uniform(0.9, 1.1)
        shift = rng.uniform(-0.1, 0.1)
        patch_image = patch_image * np.float32(scale) + np.float32(shift)
        return patch_image, target, known_row

    @staticmethod
    def _swap_index(channel: int) -> int:
        for left, right in LR_SWAP_PAIRS:
            if channel == left:
                return right
            if channel == right:
                return left
        return channel

    def batch(self, batch_size: int, rng: np.random.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,1,D,H,W) float32 image, (B,C,D,H,W) float32 target, (B,C) bool known (drawn
        with ``rng``, default the sampler's own)."""
        items = [self._one(rng) for _ in range(batch_size)]
        return (
            torch.from_numpy(np.stack([i[0] for i in items])),
            torch.from_numpy(np.stack([i[1] for i in items])),
            torch.from_numpy(np.stack([i[2] for i in items])),
        )


class ThreadedBatches:
    """Batches of one :class:`PatchSampler` drawn ahead by worker threads (numpy releases the
    GIL while it copies), each with its own generator seeded from ``rng``: for a GPU that
    would otherwise wait on one CPU core. A resumed run does not draw the same batches.
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, threads: int,
                 rng: np.random.Generator) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        self.sampler = sampler
        self.batches: queue.Queue[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (
            queue.Queue(maxsize=2 * threads))
        self.stopped = threading.Event()
        seeds = rng.integers(0, 2**63 - 1, size=threads)
        self.workers = [
            threading.Thread(target=self._work, args=(batch_size, np.random.default_rng(seed)),
                             daemon=True, name=f"batches-{i}")
            for i, seed in enumerate(seeds)
        ]
        for worker in self.workers:
            worker.start()

    def _work(self, batch_size: int, rng: np.random.Generator) -> None:
        while not self.stopped.is_set():
            item = self.sampler.batch(batch_size, rng)
            while not self.stopped.is_set():
                try:
                    self.batches.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.batches.get()

    def close(self) -> None:
        self.stopped.set()


def _padded_window(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                   fill: float) -> np.ndarray:
    """``array[start:start + size]`` on each axis, ``fill`` where the window leaves it."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    source, dest = [], []
    for a, n, s in zip(start, size, array.shape, strict=True):
        low, high = max(a, 0), min(a + n, s)
        source.append(slice(low, max(low, high)))
        dest.append(slice(low - a, max(low, high) - a))
    out[tuple(dest)] = array[tuple(source)]
    return out


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float,
    bf16: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Gaussian-blended sliding-window probabilities (C, D, H, W) for a (D, H, W) image
    (``model`` on ``device``)."""
    pad = [(0, max(0, p - s)) for p, s in zip(patch_size, image.shape, strict=True)]
    padded = np.pad(image.astype(np.float32), pad, constant_values=-1.0)
    weight = gaussian_importance(patch_size)
    accum = np.zeros((len(ORGANS),) + padded.shape, dtype=np.float32)
    norm = np.zeros(padded.shape, dtype=np.float32)
    starts = [
        symmetric_window_starts(size, patch, overlap)
        for size, patch in zip(padded.shape, patch_size, strict=True)
    ]
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                window = (slice(a, a + patch_size[0]), slice(b, b + patch_size[1]),
                          slice(c, c + patch_size[2]))
                x = torch.from_numpy(np.ascontiguousarray(padded[window]))[None, None]
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                    enabled=bf16):
                    logits = model(x.to(device))
                probs = torch.sigmoid(logits.float())[0].cpu().numpy()
                accum[(slice(None),) + window] += probs * weight
                norm[window] += weight
    probs_full = accum / norm
    return probs_full[(slice(None),) + tuple(slice(0, s) for s in image.shape)]


def dice_score(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = prediction.sum() + reference.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(prediction, reference).sum() / total)


def validate(
    model: nn.Module, cases: Sequence[CaseArrays], config: TrainConfig,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean Dice per structure over ``cases`` (only where the structure is known)."""
    model.eval()
    scores: dict[str, list[float]] = {organ.roi_name: [] for organ in ORGANS}
    for case in cases:
        probs = sliding_window_logits(model, case.image.astype(np.float32), config.patch_size,
                                      config.val_overlap, bf16=config.bf16, device=device)
        masks = case.channel_masks()
        for channel, organ in enumerate(ORGANS):
            if case.known[channel]:
                scores[organ.roi_name].append(dice_score(probs[channel] >= 0.5, masks[channel]))
    model.train()
    return {name: float(np.mean(values)) for name, values in scores.items() if values}


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    # ``step`` counts the scheduler's own steps, i.e. global steps since ``schedule_start``.
    length = max(1, config.steps - config.schedule_start)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        progress = min(1.0, step / length)
        return warm * (1.0 - progress) ** 0.9

    return factor


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` (tensors and plain types only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a format-{CHECKPOINT_FORMAT} rtcontour checkpoint")
    return payload  # type: ignore[no-any-return]


def _python_state_to_plain(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(state: Sequence[Any]) -> tuple[Any, ...]:
    return (state[0], tuple(state[1]), state[2])


def _load_weights(model: nn.Module, optimizer: torch.optim.Optimizer,
                  payload: dict[str, Any]) -> list[str]:
    """Load a checkpoint's model and optimiser state; a network that gained deep-supervision
    heads since (a warm restart with ``deep_supervision``) starts them fresh, with fresh Adam
    moments. Returns the names of the weights that were not in the checkpoint."""
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if unexpected or any(not name.startswith("aux_heads.") for name in missing):
        raise ValueError(f"checkpoint does not fit the network: missing {missing}, "
                         f"unexpected {unexpected} (deep supervision can be added to a "
                         "checkpoint, not removed)")
    saved = payload["optimizer"]
    if missing:
        n_saved = sum(len(group["params"]) for group in saved["param_groups"])
        n_new = len(list(model.parameters())) - n_saved
        groups = [dict(group) for group in saved["param_groups"]]
        # the heads are registered last, so their parameters are the last indices
        groups[-1]["params"] = list(groups[-1]["params"]) + list(range(n_saved, n_saved + n_new))
        saved = {"state": saved["state"], "param_groups": groups}
        log.info("deep supervision: %d new head tensors start from scratch", len(missing))
    optimizer.load_state_dict(saved)
    return list(missing)


def _fit_schedule(config: TrainConfig, scheduler: torch.optim.lr_scheduler.LambdaLR,
                  step: int, seconds_left: float, seconds_per_step: float) -> None:
    """Set ``config.steps`` to the steps that fit in ``seconds_left`` and let the schedule
    decay to it."""
    config.steps = step + max(1, int(seconds_left / seconds_per_step))
    scheduler.lr_lambdas = [_lr_lambda(config) for _ in scheduler.lr_lambdas]


def train(
    config: TrainConfig,
    train_cases: Sequence[CaseArrays],
    val_cases: Sequence[CaseArrays],
    run_dir: Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    restart_schedule: bool = False,
    device: str = "cpu",
    time_budget_s: float | None = None,
    sampler_threads: int = 0,
) -> dict[str, Any]:
    """Run (or resume) training; returns the final checkpoint payload.

    ``stop_after``: stop (with a checkpoint) after that global step, for tests and
    interruptions; the LR schedule still follows ``config.steps``.
    ``restart_schedule`` (with ``resume``): keep weights and optimiser moments but start a
    new warm-up and decay from ``config.lr`` at the checkpoint's step to ``config.steps``.
    ``device``: ``cpu`` or ``cuda`` (the batches are drawn on the CPU and augmented there).
    ``time_budget_s``: wall-clock budget in seconds; after a few timed steps ``config.steps``
    is set to what fits (the schedule decays to it) and training stops when it is spent.
    ``sampler_threads``: draw batches ahead in that many threads (:class:`ThreadedBatches`;
    0: in the training loop, exactly resumable).
    """
    if restart_schedule and not resume:
        raise ValueError("restart_schedule needs resume=True")
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    started_at = time.monotonic()
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    step, best_dice, history = 0, -1.0, []
    payload = load_checkpoint(last_path) if resume else None
    if payload is not None:
        step, best_dice = int(payload["step"]), float(payload["best_dice"])
        if TrainConfig.from_dict(payload["config"]).reference_qa != config.reference_qa:
            log.warning("the reference contour check is %s from step %d: validation references "
                        "change, so the best validation Dice so far (%.4f) is forgotten",
                        "on" if config.reference_qa else "off", step, best_dice)
            best_dice = -1.0
    if restart_schedule:
        if step >= config.steps:
            raise ValueError(f"restart_schedule: total steps {config.steps} must exceed the "
                             f"checkpoint's step {step}")
        config.schedule_start = step
    # The scheduler exists before the optimiser state is loaded: creating it afterwards
    # would overwrite the restored learning rate with the schedule's first value.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    if payload is not None:
        _load_weights(model, optimizer, payload)
        if restart_schedule:  # the loaded state holds the old schedule's rates: use the new
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["initial_lr"], group["lr"] = config.lr, lr
        else:
            scheduler.load_state_dict(payload["scheduler"])
        history = list(payload["history"])
        torch.set_rng_state(payload["rng"]["torch"])
        rng.bit_generator.state = payload["rng"]["numpy"]
        random.setstate(_python_state_from_plain(payload["rng"]["python"]))
        log.info("resumed %s at step %d (best val Dice %.4f)", last_path, step, best_dice)
    ema: ModelEMA | None = None
    eval_model: nn.Module = model
    if config.ema_decay > 0.0:
        # starts at the (loaded) weights; a warm start needs no decay warm-up
        ema = ModelEMA(model, config.ema_decay, warmup=payload is None)
        if payload is not None and "ema" in payload:
            ema.load_state_dict(payload["ema"])
        eval_model = build_model(config).to(device)
    spatial = config.spatial_augmentation()
    intensity = IntensityAugmentation() if config.intensity_aug else None
    crop = (None if spatial is None
            else crop_size(config.patch_size, config.target_spacing_mm, spatial))
    sampler = PatchSampler(train_cases, config.patch_size, config.foreground_fraction, rng,
                           config.structure_weights, crop_size=crop)
    batches: PatchSampler | ThreadedBatches = sampler
    if sampler_threads > 0:
        batches = ThreadedBatches(sampler, config.batch_size, sampler_threads, rng)
    pos_weight = torch.tensor(config.pos_weight, dtype=torch.float32, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %d parameters; %d train / %d val cases; %d steps of batch %d, patch %s "
             "on %s; spatial augmentation %s (crop %s), intensity augmentation %s, EMA %s, "
             "deep supervision heads %d", config.arch, n_params, len(train_cases),
             len(val_cases), config.steps, config.batch_size, config.patch_size, device,
             spatial, crop, config.intensity_aug, config.ema_decay or "off",
             config.deep_supervision)

    def payload_now(current_step: int) -> dict[str, Any]:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": current_step,
            "best_dice": best_dice,
            "history": history,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": rng.bit_generator.state,
                "python": _python_state_to_plain(random.getstate()),
            },
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        return state

    model.train()
    last_save = time.monotonic()
    window_loss: list[float] = []
    window_data_s = window_augment_s = 0.0
    tick = time.monotonic()
    first_step = step
    # fit the schedule to the budget from the pace after 5 warm-up steps, refined twice
    calibrate_at = ({first_step + 15, first_step + 60, first_step + 250}
                    if time_budget_s is not None else set())
    paced_from = time.monotonic()
    autocast_device = torch.device(device).type
    final_step = config.steps if stop_after is None else min(config.steps, stop_after)
    while step < final_step:
        drawn = time.perf_counter()
        image, target, known = batches.batch(config.batch_size)
        image, target, known = image.to(device), target.to(device), known.to(device)
        augmented = time.perf_counter()
        if spatial is not None:
            image, target = spatial_augment(image, target, config.patch_size,
                                            config.target_spacing_mm, spatial, rng,
                                            soft=config.soft_targets)
        if intensity is not None:
            image = intensity_augment(image, intensity, rng)
        window_data_s += augmented - drawn
        window_augment_s += time.perf_counter() - augmented
        with torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=config.bf16):
            outputs = (model.forward_deep(image) if config.deep_supervision
                       else [model(image)])
        loss, parts = deep_supervision_loss(outputs, target, known, pos_weight,
                                            soft=config.soft_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1
        window_loss.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, window_loss[-1])
        if step == first_step + 5:
            paced_from = time.monotonic()
        if step in calibrate_at and time_budget_s is not None:
            elapsed = time.monotonic() - started_at
            per_step = (time.monotonic() - paced_from) / (step - first_step - 5)
            _fit_schedule(config, scheduler, step, time_budget_s - elapsed, per_step)
            final_step = config.steps if stop_after is None else min(config.steps, stop_after)
            log.info("time budget %.0f s: %.3f s/step, schedule decays to step %d",
                     time_budget_s, per_step, config.steps)
        if step % 25 == 0:
            elapsed = time.monotonic() - tick
            log.info("step %d/%d loss %.4f (bce %.4f dice %.4f) lr %.2e %.2f s/step "
                     "(batch %.3f s, augmentation %.3f s)",
                     step, config.steps, float(np.mean(window_loss)), parts["bce"],
                     parts["dice_loss"], scheduler.get_last_lr()[0], elapsed / len(window_loss),
                     window_data_s / len(window_loss), window_augment_s / len(window_loss))
            window_loss, tick = [], time.monotonic()
            window_data_s = window_augment_s = 0.0
        out_of_time = (time_budget_s is not None
                       and time.monotonic() - started_at > time_budget_s)
        is_val = bool(val_cases) and (step % config.val_every == 0 or step == config.steps
                                      or out_of_time)
        if is_val:
            validated = time.monotonic()
            if ema is not None:
                ema.copy_to(eval_model)
            per_structure = validate(eval_model, val_cases, config, device)
            model.train()
            mean_dice = float(np.mean(list(per_structure.values())))
            history.append({"step": step, "mean_dice": mean_dice, **per_structure})
            log.info("validation step %d%s: mean Dice %.4f | %s (%.0f s)", step,
                     " (EMA weights)" if ema is not None else "", mean_dice,
                     " ".join(f"{k}={v:.3f}" for k, v in per_structure.items()),
                     time.monotonic() - validated)
            if mean_dice > best_dice:
                best_dice = mean_dice
                atomic_save(payload_now(step), best_path)
                log.info("new best checkpoint %s (mean Dice %.4f)", best_path, best_dice)
            tick = time.monotonic()
        if is_val or time.monotonic() - last_save > 60 * config.checkpoint_minutes:
            atomic_save(payload_now(step), last_path)
            last_save = time.monotonic()
        if out_of_time:
            log.warning("time budget of %.0f s spent at step %d of %d", time_budget_s, step,
                        config.steps)
            break
    if isinstance(batches, ThreadedBatches):
        batches.close()
    final = payload_now(step)
    atomic_save(final, last_path)
    log.info("stopped at step %d; checkpoint %s", step, last_path)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``rtcontour train``)."""
    from tqdm import tqdm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = args.runs_dir / args.run
    data_dir = args.data_dir or default_data_dir()
    if args.restart_schedule and not (args.resume and "--steps" in argv):
        raise SystemExit("rtcontour train: --restart-schedule needs --resume and --steps")
    if args.no_reference_qa and args.resume and not args.restart_schedule:
        raise SystemExit("rtcontour train: --no-reference-qa changes the training data; on "
                         "--resume it needs --restart-schedule")
    if args.resume:
        stored = TrainConfig.from_dict(load_checkpoint(run_dir / "last.pt")["config"])
        if args.restart_schedule:
            log.info("warm restart: LR %.1e decaying to step %d", args.lr, args.steps)
            stored.steps, stored.lr = args.steps, args.lr
            stored.reference_qa = not args.no_reference_qa
        elif args.steps != stored.steps and "--steps" in " ".join(argv):
            log.warning("changing total steps from %d to %d on resume: the LR schedule "
                        "differs from an uninterrupted run", stored.steps, args.steps)
            stored.steps = args.steps
        if "--val-every" in argv:
            stored.val_every = args.val_every
        if "--threads" in argv:  # speed only, not the recipe
            stored.threads = args.threads
        if "--val-cases" in argv:  # which cases judge best.pt, not the recipe
            stored.val_cases = args.val_cases
        if args.no_bf16 and stored.bf16:
            # bf16 autocast is emulated (~20x slower) on CPUs without AVX-512 BF16
            log.warning("resuming in float32 (the checkpoint trained under bf16 autocast)")
            stored.bf16 = False
        changes = recipe_changes(argv, args, stored)
        if changes and not args.restart_schedule:
            raise SystemExit(f"rtcontour train: {', '.join(sorted(changes))} differ from the "
                             "checkpoint's recipe; on --resume that needs --restart-schedule")
        for name, value in changes.items():
            log.info("warm restart: %s %r -> %r", name, getattr(stored, name), value)
            setattr(stored, name, value)
        if args.soft_targets and not stored.soft_targets:
            # The targets become the references' occupancy of each voxel: a change of what
            # the network is fitted to, not of the recipe's schedule, which continues.
            log.warning("switching to soft targets at this resume; the LR schedule continues")
            stored.soft_targets = True
        if args.rebalance:
            log.warning("resuming with the current default structure_weights %s and "
                        "pos_weight %s (were %s and %s)", TrainConfig.structure_weights,
                        TrainConfig.pos_weight, stored.structure_weights, stored.pos_weight)
            stored.structure_weights = TrainConfig.structure_weights
            stored.pos_weight = TrainConfig.pos_weight
        config = stored
        config.command = config.command + [" ".join(["rtcontour train", *argv])]
    else:
        config = TrainConfig(
            run=args.run, arch=args.arch, base_channels=args.base_channels, levels=args.levels,
            max_channels=args.max_channels, patch_size=args.patch, batch_size=args.batch,
            steps=args.steps, lr=args.lr, val_every=args.val_every, val_cases=args.val_cases,
            checkpoint_minutes=args.checkpoint_minutes, seed=args.seed, threads=args.threads,
            bf16=not args.no_bf16, data_dir=str(data_dir), train_limit=args.train_limit,
            reference_qa=not args.no_reference_qa, command=[" ".join(["rtcontour train", *argv])],
            spatial_aug_p=args.spatial_aug, rotation_deg=args.rotation_deg,
            tilt_deg=args.tilt_deg, scale_range=args.scale_range,
            intensity_aug=args.intensity_aug, ema_decay=args.ema_decay,
            deep_supervision=args.deep_supervision, soft_targets=args.soft_targets,
        )
    torch.set_num_threads(config.threads)
    train_cases = load_split(data_dir, "train", args.cache_dir, config.target_spacing_mm,
                             limit=config.train_limit or None,
                             reference_qa=config.reference_qa,
                             soft_targets=config.soft_targets)
    val_cases = load_split(data_dir, "validation", args.cache_dir, config.target_spacing_mm,
                           limit=config.val_cases, reference_qa=config.reference_qa,
                           soft_targets=config.soft_targets)
    bar = tqdm(total=config.steps, disable=args.no_progress or not sys.stderr.isatty(),
               desc="train")

    def on_step(step: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh()

    final = train(config, train_cases, val_cases, run_dir, resume=args.resume,
                  stop_after=args.stop_after, on_step=on_step,
                  restart_schedule=args.restart_schedule)
    bar.close()
    print(f"step {final['step']}; best validation mean Dice {final['best_dice']:.4f}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
