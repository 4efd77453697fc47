"""Every text value of a dataset against its VR's maximum length (DICOM PS3.5, section 6.2).

``dciodvfy`` reports an over-long value only for the attributes its IOD tables know; this walks
every element, sequences included, so a writer's test catches a Dose Comment (LO, 64) of 78
characters whatever the checker knows.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# PS3.5 Table 6.2-1: maximum length in characters of one value (PN: of one component group).
MAX_VALUE_LENGTH = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
    "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64,
}


def _values(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def vr_length_violations(dataset: Dataset, where: str = "") -> list[str]:
    """``"Keyword (VR, n > max): value"`` for every value longer than its VR allows."""
    found: list[str] = []
    for element in dataset:
        name = where + (element.keyword or str(element.tag))
        if element.VR == "SQ":
            for index, item in enumerate(element.value or []):
                found += vr_length_violations(item, f"{name}[{index}].")
            continue
        limit = MAX_VALUE_LENGTH.get(str(element.VR))
        if limit is None:
            continue
        for value in _values(element.value):
            if element.VR == "PN":
                parts = [str(group) for group in str(PersonName(value)).split("=")]
            elif element.VR in {"DS", "IS"} and not isinstance(value, str):
                parts = [str(getattr(value, "original_string", None) or value)]
            else:
                parts = [str(value)]
            for text in parts:
                if len(text) > limit:
                    found.append(f"{name} ({element.VR}, {len(text)} > {limit}): {text!r}")
    return found
