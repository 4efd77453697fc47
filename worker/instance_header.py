"""The header of a DICOM object rtcontour derives from a CT series (RTSTRUCT, RTDOSE).

``derived_instance_header`` gives the dataset with its file meta and the modules every such
object shares: SOP Common; Patient, General Study and Patient Study copied from the CT
(PS3.3 C.7.1.1, C.7.2.1, C.7.2.2), Type 2 attributes written empty where the CT lacks them;
General Series; General Equipment (rtcontour, the model); Frame of Reference. The writers add
their own modules (Structure Set, RT Dose, ...) to it.
"""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ImplicitVRLittleEndian

from rtcontour.common.volume import CtSeries

__all__ = ["MANUFACTURER", "derived_instance_header"]

MANUFACTURER = "rtcontour"
# Patient, General Study and Patient Study attributes copied from the CT.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
COPIED_OPTIONAL = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthTime",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "ReferringPhysicianIdentificationSequence",
)


def derived_instance_header(
    series: CtSeries,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    modality: str,
    series_number: int,
    series_description: str,
    model_name: str,
    model_version: str,
    software_version: str,
    when: dt.datetime,
) -> Dataset:
    """A dataset (with file meta, Implicit VR Little Endian) holding the modules shared by
    the objects derived from ``series`` (see the module docstring), in its study and frame
    of reference; ``when`` (local time) is its instance creation and series date and time.

    Long strings are cut to their VR's length: ``series_description`` and ``model_name``
    (Manufacturer's Model Name) to 64 characters.
    """
    ct = series.header
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    dataset.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta.ImplementationVersionName = "RTCONTOUR"
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    if "SpecificCharacterSet" in ct:
        dataset.SpecificCharacterSet = ct.SpecificCharacterSet
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = date, time
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = sop_instance_uid
    for keyword in COPIED_TYPE2:
        setattr(dataset, keyword, ct.get(keyword, ""))
    for keyword in COPIED_OPTIONAL:
        if keyword in ct:
            setattr(dataset, keyword, ct.get(keyword))
    dataset.StudyInstanceUID = series.study_instance_uid
    dataset.SeriesDate, dataset.SeriesTime = date, time
    dataset.Modality = modality
    dataset.SeriesInstanceUID = series_instance_uid
    dataset.SeriesNumber = series_number
    dataset.SeriesDescription = series_description[:64]
    dataset.OperatorsName = ""
    dataset.Manufacturer = MANUFACTURER
    dataset.ManufacturerModelName = model_name[:64]
    dataset.SoftwareVersions = [v for v in (software_version, model_version) if v][:2]
    dataset.FrameOfReferenceUID = series.frame_of_reference_uid
    dataset.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    dataset.InstanceNumber = 1
    return dataset
