"""DICOM Segmentation (SEG) from masks on a CT series' grid, written by highdicom.

Public API (used by the worker pipeline's ``SegWriter``)::

    from rtcontour.worker.seg import build_seg, seg_uids, structure_code

    dataset = build_seg(
        series,                       # common.volume.CtSeries (from load_series)
        ct_headers,                   # the series' instances (pixels not needed), any order
        {"Brainstem": mask, ...},     # roi_name -> bool (slices, rows, columns) on series.volume
        [RoiSpec("Brainstem", (0, 255, 0), "ORGAN"), ...],
        model_name="hn-unet", model_version="1.2.0",
    )

A BINARY segmentation, one segment per structure that has voxels (overlaps are kept, which a
labelmap could not), in the order of ``rois``, labelled with the TG-263 name and coded with
SNOMED CT (``structure_code``: the organs rtcontour contours; any other name becomes an
"Anatomical structure" with the name as label). Every segment carries the algorithm
identification (model name and version, family "Artificial Intelligence"). Frames are the
masks voxel for voxel on the CT's grid, each referencing its CT image; empty frames are left
out. Series and SOP Instance UIDs derive from (CT series UID, model name, model version), so a
repeated job yields the same object. An empty structure is left out, as in the RTSTRUCT; with
no structure at all ``build_seg`` raises ``ValueError`` (a SEG needs one segment).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from rtcontour.common import __version__
from rtcontour.common.volume import CtSeries
from rtcontour.worker.instance_header import MANUFACTURER
from rtcontour.worker.rtstruct import RoiSpec

logger = logging.getLogger(__name__)

__all__ = ["SegUids", "build_seg", "seg_uids", "structure_code"]

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:rtcontour:seg")
SERIES_NUMBER = 9002  # the RTSTRUCT's series is rtcontour's first; the SEG beside it
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
_LEFT = Code("7771000", "SCT", "Left")
_RIGHT = Code("24028007", "SCT", "Right")


@dataclass(frozen=True)
class StructureCode:
    """A structure's SNOMED CT type and laterality (None: unpaired organ)."""

    property_type: Code
    laterality: Code | None = None


# TG-263 name -> SNOMED CT code (the organs of rtcontour's packages; common.structure_names
# maps clinics' names to these TG-263 names).
_STRUCTURE_CODES: Mapping[str, StructureCode] = {
    "Brainstem": StructureCode(Code("15926001", "SCT", "Brainstem")),
    "SpinalCord": StructureCode(Code("2748008", "SCT", "Spinal cord")),
    "Parotid_L": StructureCode(Code("45289007", "SCT", "Parotid gland"), _LEFT),
    "Parotid_R": StructureCode(Code("45289007", "SCT", "Parotid gland"), _RIGHT),
    "Esophagus": StructureCode(Code("32849002", "SCT", "Esophagus")),
    "Larynx": StructureCode(Code("4596009", "SCT", "Larynx")),
    "Bone_Mandible": StructureCode(Code("91609006", "SCT", "Mandible")),
    "External": StructureCode(Code("38266002", "SCT", "Entire body")),
}


def structure_code(roi_name: str) -> StructureCode:
    """The SNOMED CT code of a TG-263 structure name; a name rtcontour does not know is an
    anatomical structure (SCT 91723000), its label saying which."""
    return _STRUCTURE_CODES.get(
        roi_name, StructureCode(Code("91723000", "SCT", "Anatomical structure"))
    )


@dataclass(frozen=True)
class SegUids:
    series_instance_uid: str
    sop_instance_uid: str


def seg_uids(series_uid: str, model_name: str, model_version: str) -> SegUids:
    """The SEG's Series and SOP Instance UIDs for a CT series and model (deterministic)."""
    name = "\\".join([series_uid, model_name, model_version])
    return SegUids(_uuid5_uid(f"series\\{name}"), _uuid5_uid(f"instance\\{name}"))


def _uuid5_uid(name: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def build_seg(
    series: CtSeries,
    ct_headers: Sequence[Dataset],
    masks_by_roi: Mapping[str, np.ndarray],
    rois: Sequence[RoiSpec],
    *,
    model_name: str,
    model_version: str,
    software_version: str = __version__,
) -> Dataset:
    """Return a binary Segmentation (a highdicom ``Segmentation``, with file meta) of the
    non-empty masks, one segment per ROI in ``rois`` order.

    ``ct_headers``: the series' CT instances (read with or without pixels, any order); one per
    slice of ``series.volume``, matched by SOP Instance UID. ``masks_by_roi``: roi name -> bool
    array (slices, rows, columns) on ``series.volume``'s stored grid.
    """
    shape = series.volume.shape
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct_headers}
    missing = [uid for uid in series.volume.sop_instance_uids if uid not in by_uid]
    if missing:
        raise ValueError(
            f"ct_headers lacks {len(missing)} of the series' {shape[0]} instances "
            f"(first missing: {missing[0]})"
        )
    if not model_name or not model_version:
        raise ValueError(f"model_name {model_name!r} and model_version {model_version!r} "
                         "must both be given (they identify the algorithm)")
    source_images = [by_uid[uid] for uid in series.volume.sop_instance_uids]
    written: list[tuple[RoiSpec, np.ndarray]] = []
    for roi in rois:
        if roi.name not in masks_by_roi:
            raise ValueError(f"masks_by_roi has no mask for ROI {roi.name!r}")
        mask = np.asarray(masks_by_roi[roi.name], dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask of {roi.name!r} has shape {mask.shape}, the CT {shape}")
        if mask.any():
            written.append((roi, mask))
    if not written:
        raise ValueError("every mask is empty: a SEG needs one segment at least")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=model_version[:64],
        source=MANUFACTURER,
    )
    descriptions = []
    for number, (roi, _) in enumerate(written, start=1):
        code = structure_code(roi.name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=roi.name[:64],
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=code.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=roi.name[:64],
            tracking_uid=_uuid5_uid(f"track\\{series.series_instance_uid}\\{roi.name}"),
            display_color=hd.color.CIELabColor.from_rgb(*roi.colour_rgb),
        )
        if code.laterality is not None:
            modifier = Dataset()
            modifier.CodeValue = code.laterality.value
            modifier.CodingSchemeDesignator = code.laterality.scheme_designator
            modifier.CodeMeaning = code.laterality.meaning
            description.SegmentedPropertyTypeCodeSequence[0] \
                .SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    # (slices, rows, columns, segments): frame i of segment j is slice i of ROI j.
    pixel_array = np.stack([mask for _, mask in written], axis=-1).astype(np.uint8)
    uids = seg_uids(series.series_instance_uid, model_name, model_version)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{model_name}"[:64],
        software_versions=software_version,
        device_serial_number="0",
        content_description=f"{MANUFACTURER} {model_name} {model_version}"[:64],
        content_creator_name="rtcontour^auto",
        content_label="AUTO",
        omit_empty_frames=True,
    )
    seg.SeriesDescription = f"{MANUFACTURER} SEG {model_name} {model_version}"[:64]
    logger.info(
        "built SEG %s for series %s: %d segments, %d frames",
        uids.sop_instance_uid,
        series.series_instance_uid,
        len(descriptions),
        int(seg.NumberOfFrames),
    )
    return seg
