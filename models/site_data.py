"""The site data set: approved structure sets kept on purpose as training data (issue 23).

A route with ``keep_for_training: true`` keeps, for each approved structure set that QA
compared, the CT and the approved contours under ``<root>/<set_id>/`` (``root`` is
``RTCONTOUR_SITE_DATASET_DIR``, by default ``<data dir>/site-dataset``; nothing is sent
anywhere):

- ``case.npz``: ``hu`` int16 (slices, rows, columns) the CT in canonical orientation resampled
  (trilinearly) to the model grid ``spacing_mm``; ``soft`` uint8 (7, slices, rows, columns) each
  approved organ's exact partial-volume occupancy of the grid's voxels times
  :data:`models.data.SOFT_SCALE` (:func:`models.data.resample_occupancy`, the contour campaign's
  soft targets); ``known`` bool (7,) whether the clinicians' set holds the organ with contours.
  An organ they did not draw (or left empty) is **unknown**, not background: the training loss
  ignores it for that patient.
- ``meta.json`` (:class:`KeptSet`): which jobs it came from, the pseudonymous patient key (a
  sha256 of the Patient ID: the ID itself is not written here), the clinic's name of each
  organ, the grid, when it was kept.

A set's id is the structure set job's id, so a retried job replaces its set. No patient
name, Patient ID or DICOM header is stored beside the arrays. No torch here: the API lists and
deletes sets, the worker writes them, ``rtcontour finetune`` (:mod:`models.finetune`) reads them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtcontour.models.data import SOFT_SCALE, CaseArrays, normalise_hu, resample_occupancy
from rtcontour.models.labels import ORGANS
from rtcontour.models.resampling import resample_linear

__all__ = [
    "CASE_NAME",
    "META_NAME",
    "KeptSet",
    "SiteDataset",
    "patient_key",
]

log = logging.getLogger(__name__)

CASE_NAME = "case.npz"
META_NAME = "meta.json"
FORMAT = 1
_SET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


def patient_key(patient_id: str) -> str:
    """The pseudonymous key a kept set is filed under: sha256 of the Patient ID (stripped)."""
    return hashlib.sha256(f"rtcontour-site:{patient_id.strip()}".encode()).hexdigest()


@dataclass(frozen=True)
class KeptSet:
    """What ``meta.json`` says about one kept set (no patient name or ID)."""

    set_id: str
    patient_key: str
    kept_at: str  # ISO 8601, UTC
    spacing_mm: tuple[float, float, float]  # of the stored grid (slice, row, column)
    shape: tuple[int, int, int]
    structures: dict[str, str]  # TG-263 organ -> the clinic's ROI name it came from
    unknown: tuple[str, ...]  # organs the approved set did not hold (or held empty)
    contour_job_id: str | None = None
    structure_set_job_id: str | None = None
    reference_sop_instance_uid: str | None = None
    route: str | None = None
    model: str | None = None  # the package whose contours QA compared
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> KeptSet:
        known = set(cls.__dataclass_fields__)
        kwargs = {key: value for key, value in values.items() if key in known}
        kwargs["spacing_mm"] = tuple(float(v) for v in kwargs["spacing_mm"])
        kwargs["shape"] = tuple(int(v) for v in kwargs["shape"])
        kwargs["unknown"] = tuple(kwargs.get("unknown", ()))
        return cls(**kwargs)

    def kept_datetime(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.kept_at)


class SiteDataset:
    """The kept sets under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- writing ------------------------------------------------------------------------------
    def keep(
        self,
        set_id: str,
        *,
        hu: np.ndarray,
        spacing_mm: Sequence[float],
        organ_masks: Mapping[str, np.ndarray],
        organ_names: Mapping[str, str],
        patient_id: str,
        target_spacing_mm: Sequence[float],
        now: dt.datetime | None = None,
        **details: Any,
    ) -> KeptSet:
        """Keep one approved set; returns its :class:`KeptSet`.

        ``hu``: the CT in canonical orientation (slices S->I, rows A->P, columns R->L), HU,
        with ``spacing_mm`` (slice, row, column); ``organ_masks``: TG-263 organ name (one of
        :data:`models.labels.ORGANS`) -> bool mask on that grid; ``organ_names``: the clinic's
        ROI name of each; organs not given are unknown. ``target_spacing_mm``: the model grid.
        ``details``: ``contour_job_id``, ``structure_set_job_id``, ``reference_sop_instance_uid``,
        ``route``, ``model``. Written to a temporary folder and renamed, so a reader never sees
        half a set; an existing set of that id is replaced.
        """
        if not _SET_ID.match(set_id):
            raise ValueError(f"set_id {set_id!r} is not an id (letters, digits, '_.-')")
        if hu.ndim != 3:
            raise ValueError(f"hu must be 3-D (slices, rows, columns), not shape {hu.shape}")
        spacing = tuple(float(s) for s in spacing_mm)
        target = tuple(float(s) for s in target_spacing_mm)
        names = {organ.roi_name for organ in ORGANS}
        unknown_names = sorted(set(organ_masks) - names)
        if unknown_names:
            raise ValueError(f"organ_masks names {unknown_names}: not organs of the model "
                             f"({', '.join(sorted(names))})")
        image = resample_linear(np.asarray(hu, dtype=np.float32), spacing, target)
        soft = np.zeros((len(ORGANS), *image.shape), dtype=np.uint8)
        known = np.zeros(len(ORGANS), dtype=bool)
        structures: dict[str, str] = {}
        for channel, organ in enumerate(ORGANS):
            mask = organ_masks.get(organ.roi_name)
            if mask is None or not mask.any():
                continue
            if mask.shape != hu.shape:
                raise ValueError(f"mask {organ.roi_name} has shape {mask.shape}, the CT "
                                 f"{hu.shape}")
            occupancy = resample_occupancy(mask, spacing, target)
            soft[channel] = np.rint(occupancy * SOFT_SCALE).astype(np.uint8)
            known[channel] = True
            structures[organ.roi_name] = str(organ_names.get(organ.roi_name, organ.roi_name))
        when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        kept = KeptSet(
            set_id=set_id,
            patient_key=patient_key(patient_id),
            kept_at=when.isoformat(),
            spacing_mm=target,  # type: ignore[arg-type]
            shape=tuple(int(n) for n in image.shape),  # type: ignore[arg-type]
            structures=structures,
            unknown=tuple(o.roi_name for o, k in zip(ORGANS, known, strict=True) if not k),
            **{key: value for key, value in details.items() if value is not None},
        )
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f".{set_id}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        hu_grid = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
        np.savez_compressed(partial / CASE_NAME, hu=hu_grid, soft=soft, known=known)
        (partial / META_NAME).write_text(json.dumps(asdict(kept), indent=1) + "\n",
                                         encoding="utf-8")
        final = self.root / set_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        log.info("site data set: kept set %s (%s known, %s unknown)", set_id,
                 ", ".join(structures) or "none", ", ".join(kept.unknown) or "none")
        return kept

    # -- reading ------------------------------------------------------------------------------
    def sets(self) -> list[KeptSet]:
        """Every kept set, oldest first (unreadable folders are logged and skipped)."""
        found = []
        if not self.root.is_dir():
            return []
        for folder in sorted(self.root.iterdir()):
            meta = folder / META_NAME
            if folder.name.startswith(".") or not meta.is_file():
                continue
            try:
                found.append(KeptSet.from_json(json.loads(meta.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("site data set: %s is unreadable (%s); skipped", folder.name, error)
        return sorted(found, key=lambda kept: (kept.kept_at, kept.set_id))

    def counts(self) -> dict[str, Any]:
        """Sets and patients in all, and per organ how many sets hold it (the guard of
        ``rtcontour finetune`` counts these)."""
        sets = self.sets()
        per_structure = {organ.roi_name: 0 for organ in ORGANS}
        for kept in sets:
            for name in kept.structures:
                per_structure[name] = per_structure.get(name, 0) + 1
        return {
            "sets": len(sets),
            "patients": len({kept.patient_key for kept in sets}),
            "per_structure": per_structure,
            "oldest": sets[0].kept_at if sets else None,
            "newest": sets[-1].kept_at if sets else None,
        }

    def load(self, kept: KeptSet, clip_hu: Sequence[float]) -> CaseArrays:
        """One kept set as training arrays (image normalised with ``clip_hu``, soft targets,
        ``labels`` = occupancy >= 1/2, unknown organs ``known`` False)."""
        with np.load(self.root / kept.set_id / CASE_NAME) as npz:
            hu, soft, known = npz["hu"], npz["soft"], npz["known"]
        labels = np.zeros(hu.shape, dtype=np.uint8)
        for channel in range(len(ORGANS)):
            labels |= (soft[channel] >= (SOFT_SCALE + 1) // 2).astype(np.uint8) << channel
        image = normalise_hu(hu.astype(np.float32), clip_hu).astype(np.float16)
        return CaseArrays(kept.set_id, image, labels, known.astype(bool), kept.spacing_mm,
                          soft)

    def hu(self, kept: KeptSet) -> np.ndarray:
        """The kept CT on its grid, int16 HU (slices, rows, columns), canonical orientation."""
        with np.load(self.root / kept.set_id / CASE_NAME) as npz:
            return np.asarray(npz["hu"])

    # -- removing -----------------------------------------------------------------------------
    def delete_patient(self, patient: str) -> list[str]:
        """Remove every set of a patient, given the Patient ID or its key; the removed ids."""
        key = patient if _KEY.match(patient) else patient_key(patient)
        removed = []
        for kept in self.sets():
            if kept.patient_key == key:
                shutil.rmtree(self.root / kept.set_id, ignore_errors=True)
                removed.append(kept.set_id)
        return removed

    def delete_set(self, set_id: str) -> bool:
        if not _SET_ID.match(set_id) or not (self.root / set_id / META_NAME).is_file():
            return False
        shutil.rmtree(self.root / set_id, ignore_errors=True)
        return True

    def purge_older_than(self, days: float, now: dt.datetime | None = None) -> list[str]:
        """Remove the sets kept more than ``days`` ago (the site data set's own retention;
        ``days`` 0 keeps them until an admin removes them); returns the removed ids."""
        if days <= 0:
            return []
        limit = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=days)
        removed = []
        for kept in self.sets():
            if kept.kept_datetime() < limit:
                shutil.rmtree(self.root / kept.set_id, ignore_errors=True)
                removed.append(kept.set_id)
        if removed:
            log.info("site data set: %d set(s) past the retention of %g days removed",
                     len(removed), days)
        return removed
