"""OpenKBP loading, canonical reorientation, resampling, normalisation and caching.

OpenKBP stores ``ct_hu[i, j, k]`` with i anterior->posterior, j right->left, k
superior->inferior. We transpose to the canonical (k, i, j) = (slices S->I, rows A->P,
columns R->L) used by the whole service (docs/ARCHITECTURE.md).

Target spacing (3.0, 4.0, 4.0) mm (slice, row, column): OpenKBP in-plane voxels are 3.9 to
5.1 mm, so 4 mm keeps (almost) all in-plane information without inventing detail; slices are
2 to 3 mm, and 3 mm keeps the thin craniocaudal structures (Larynx, Esophagus ends) while the
volume stays small (<= 128 x 163 x 163 voxels) enough for CPU training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtcontour.models.labels import ORGANS
from rtcontour.models.reference_qa import QA_VERSION, reference_problems
from rtcontour.models.resampling import resample_linear, resampled_shape

__all__ = [
    "TARGET_SPACING_MM",
    "HU_CLIP",
    "CaseArrays",
    "default_data_dir",
    "load_openkbp_raw",
    "normalise_hu",
    "preprocess_case",
    "load_split",
    "occupancy_matrix",
    "resample_occupancy",
]

log = logging.getLogger(__name__)

TARGET_SPACING_MM: tuple[float, float, float] = (3.0, 4.0, 4.0)
# Soft-tissue window widened to keep bone (Mandible) and air (Larynx lumen) distinct.
HU_CLIP: tuple[float, float] = (-200.0, 300.0)
CACHE_VERSION = 1
# Soft targets keep each structure's occupancy of the training voxels (uint8, 255 = full).
SOFT_SCALE = 255
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """``../shared/data/openkbp`` relative to the repository root (``RTCONTOUR_OPENKBP_DIR``
    overrides)."""
    override = os.environ.get("RTCONTOUR_OPENKBP_DIR")
    if override:
        return Path(override)
    return (REPO_ROOT.parent / "shared" / "data" / "openkbp").resolve()


def normalise_hu(
    hu: np.ndarray, clip: Sequence[float] = HU_CLIP, out: np.ndarray | None = None
) -> np.ndarray:
    """Clip HU to ``clip`` and map it linearly to [-1, 1] (float32)."""
    low, high = float(clip[0]), float(clip[1])
    centre, half_width = (low + high) / 2.0, (high - low) / 2.0
    result = np.clip(hu, low, high, out=out, dtype=np.float32)
    result -= centre
    result /= half_width
    return result


@dataclass
class CaseArrays:
    """One preprocessed patient on the target grid (canonical orientation).

    ``image``: float16 (slices, rows, columns) normalised CT; ``labels``: uint8 bit k =
    ``ORGANS[k]``; ``known``: bool (7,) structure contoured for this patient. ``soft`` (soft
    targets only): uint8 (7, slices, rows, columns), the fraction of each training voxel the
    reference contour occupies, times :data:`SOFT_SCALE`; ``labels`` is then ``soft`` at
    >= 1/2.
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    known: np.ndarray
    spacing_mm: tuple[float, float, float]
    soft: np.ndarray | None = None

    def channel_masks(self) -> np.ndarray:
        """bool (7, slices, rows, columns) one mask per output channel."""
        bits = np.arange(len(ORGANS), dtype=np.uint8)
        return ((self.labels[None] >> bits[:, None, None, None]) & 1).astype(bool)


def load_openkbp_raw(
    path: Path, reference_qa: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read one OpenKBP npz and return canonical (hu int16, masks bool (7,...), known bool (7,),
    spacing_mm (slice, row, col)). Masks of unknown structures are all False.

    With ``reference_qa`` a reference contour failing :mod:`models.reference_qa` is logged and
    returned as unknown (not contoured), so it neither trains nor judges a model.
    """
    with np.load(path) as npz:
        ct = npz["ct_hu"].transpose(2, 0, 1)
        bits = npz["label_bits"].transpose(2, 0, 1)
        voxel_mm = npz["voxel_mm"].astype(float)
        roi_names = [str(name) for name in npz["roi_names"]]
        present = {str(name) for name in npz["rois_present"]}
    spacing = (voxel_mm[2], voxel_mm[0], voxel_mm[1])
    masks = np.zeros((len(ORGANS),) + ct.shape, dtype=bool)
    known = np.zeros(len(ORGANS), dtype=bool)
    for channel, organ in enumerate(ORGANS):
        bit = roi_names.index(organ.openkbp_name)
        known[channel] = organ.openkbp_name in present
        if known[channel]:
            masks[channel] = (bits >> bit) & 1
    if reference_qa:
        for channel, reason in reference_problems(masks, known, spacing, ct).items():
            log.warning("%s: reference %s set aside as not contoured: %s",
                        path.stem, ORGANS[channel].roi_name, reason)
            known[channel] = False
            masks[channel] = False
    return np.ascontiguousarray(ct), masks, known, spacing


def occupancy_matrix(n_in: int, spacing_in: float, n_out: int, spacing_out: float
                     ) -> np.ndarray:
    """(n_out, n_in) float32: the share of output voxel ``o`` that input voxel ``i`` covers,
    along one axis (voxel ``n`` centred at ``n * spacing``, :mod:`models.resampling`'s
    convention). Rows sum to 1 over the part of the output voxel inside the input volume."""
    in_low = (np.arange(n_in) - 0.5) * spacing_in
    out_low = (np.arange(n_out) - 0.5) * spacing_out
    overlap = np.clip(np.minimum(out_low[:, None] + spacing_out, in_low[None] + spacing_in)
                      - np.maximum(out_low[:, None], in_low[None]), 0.0, None)
    return (overlap / np.maximum(overlap.sum(axis=1, keepdims=True), 1e-9)).astype(np.float32)


def resample_occupancy(mask: np.ndarray, spacing_mm: Sequence[float],
                       target_spacing_mm: Sequence[float]) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] (float32) of each target voxel by a bool mask.

    Exact for voxels as boxes: the box average is separable, so it is three products with
    the per-axis :func:`occupancy_matrix` (written here because scipy's filters take integer
    sizes only, and trilinear sampling at the target centres, thresholded at 0.5, shrinks thin
    structures such as the cord by ~17 %).
    """
    shape = resampled_shape(mask.shape, spacing_mm, target_spacing_mm)
    matrices = [occupancy_matrix(n, s, m, t) for n, s, m, t in
                zip(mask.shape, spacing_mm, shape, target_spacing_mm, strict=True)]
    # only the bounding box of the mask contributes: cut it out first (organs are small)
    nonzero = np.nonzero(mask)
    if nonzero[0].size == 0:
        return np.zeros(shape, dtype=np.float32)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nonzero)
    result = mask[box].astype(np.float32)
    for axis, (matrix, window) in enumerate(zip(matrices, box, strict=True)):
        result = np.moveaxis(np.tensordot(matrix[:, window], result, axes=([1], [axis])),
                             0, axis)
    return np.clip(result, 0.0, 1.0)


def preprocess_case(
    path: Path, target_spacing_mm: Sequence[float] = TARGET_SPACING_MM, reference_qa: bool = True,
    soft_targets: bool = False,
) -> CaseArrays:
    """Load, resample and normalise: the CT trilinearly; each mask trilinearly and thresholded
    at 0.5, or with ``soft_targets`` as its occupancy of each voxel (:func:`resample_occupancy`,
    ``labels`` = occupancy >= 1/2)."""
    hu, masks, known, spacing = load_openkbp_raw(path, reference_qa)
    shape = resampled_shape(hu.shape, spacing, target_spacing_mm)
    image = normalise_hu(resample_linear(hu.astype(np.float32), spacing, target_spacing_mm))
    labels = np.zeros(shape, dtype=np.uint8)
    soft = np.zeros((len(ORGANS), *shape), dtype=np.uint8) if soft_targets else None
    for channel in range(len(ORGANS)):
        if known[channel] and masks[channel].any():
            if soft is not None:
                occupancy = resample_occupancy(masks[channel], spacing, target_spacing_mm)
                soft[channel] = np.rint(occupancy * SOFT_SCALE).astype(np.uint8)
                hard = soft[channel] >= (SOFT_SCALE + 1) // 2
            else:
                hard = resample_linear(masks[channel].astype(np.float32), spacing,
                                       target_spacing_mm) >= 0.5
            labels |= hard.astype(np.uint8) << channel
    return CaseArrays(
        case_id=path.stem,
        image=image.astype(np.float16),
        labels=labels,
        known=known,
        spacing_mm=tuple(float(s) for s in target_spacing_mm),  # type: ignore[arg-type]
        soft=soft,
    )


def _cache_path(cache_dir: Path, split: str, case_id: str,
                target_spacing_mm: Sequence[float], reference_qa: bool,
                soft_targets: bool = False) -> Path:
    tag = "x".join(f"{s:g}" for s in target_spacing_mm)
    tag += f"-qa{QA_VERSION}" if reference_qa else ""
    tag += "-soft" if soft_targets else ""
    return cache_dir / f"openkbp-v{CACHE_VERSION}-{tag}" / split / f"{case_id}.npz"


_BuildJob = tuple[Path, Path, str, tuple[float, float, float], bool, bool]


def _load_or_build(args: _BuildJob) -> CaseArrays:
    path, cache_dir, split, target, reference_qa, soft_targets = args
    cached = _cache_path(cache_dir, split, path.stem, target, reference_qa, soft_targets)
    if cached.exists():
        with np.load(cached) as npz:
            return CaseArrays(path.stem, npz["image"], npz["labels"], npz["known"], target,
                              npz["soft"] if soft_targets else None)
    case = preprocess_case(path, target, reference_qa, soft_targets)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.stem + f".{os.getpid()}.tmp.npz")
    arrays = {"image": case.image, "labels": case.labels, "known": case.known}
    if case.soft is not None:
        arrays["soft"] = case.soft
    np.savez(partial, **arrays)  # type: ignore[arg-type]
    os.replace(partial, cached)
    return case


def _case_sort_key(path: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return (int(digits) if digits else 0, path.stem)


def list_cases(data_dir: Path, split: str) -> list[Path]:
    """npz files of a split (``train`` or ``validation``) in patient-number order."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"OpenKBP split folder {folder} does not exist")
    return sorted(folder.glob("*.npz"), key=_case_sort_key)


def load_split(
    data_dir: Path,
    split: str,
    cache_dir: Path,
    target_spacing_mm: Sequence[float] = TARGET_SPACING_MM,
    limit: int | None = None,
    workers: int = 2,
    reference_qa: bool = True,
    soft_targets: bool = False,
) -> list[CaseArrays]:
    """Preprocessed cases of a split, built once and cached under ``cache_dir``
    (``reference_qa``: see :func:`load_openkbp_raw`; ``soft_targets``: see
    :func:`preprocess_case`)."""
    paths = list_cases(data_dir, split)
    if limit is not None:
        paths = paths[:limit]
    target = (float(target_spacing_mm[0]), float(target_spacing_mm[1]),
              float(target_spacing_mm[2]))
    jobs: list[_BuildJob] = [(path, Path(cache_dir), split, target, reference_qa, soft_targets)
                             for path in paths]
    missing = sum(
        not _cache_path(Path(cache_dir), split, p.stem, target, reference_qa,
                        soft_targets).exists()
        for p in paths
    )
    if missing:
        log.info("preprocessing %d of %d %s cases into %s", missing, len(paths), split, cache_dir)
    if missing > 4 and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            cases = list(pool.map(_load_or_build, jobs, chunksize=4))
    else:
        cases = [_load_or_build(job) for job in jobs]
    return cases  # type: ignore[return-value]
