"""One CT series out of a folder of DICOM files, for the offline commands (``rtcontour
segment``, ``rtcontour mask2rtstruct``): other files and modalities are skipped, and a folder
holding several CT series is refused with each one listed, to be chosen by ``--series-uid``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.errors


class SeriesChoiceError(ValueError):
    """A folder without the one CT series asked for; the message lists what it holds."""


@dataclass(frozen=True)
class FolderSeries:
    """One series found in a folder: its UID, modality, description and files (sorted)."""

    series_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]

    def line(self) -> str:
        """``UID  "description"  N images`` (modality added when not CT), for listings."""
        modality = "" if self.modality == "CT" else f"{self.modality or 'no modality'}, "
        images = f"{len(self.files)} image{'s' if len(self.files) != 1 else ''}"
        return f"{self.series_uid}  {self.description or '(no description)'!r}  {modality}{images}"


def series_in_folder(folder: Path) -> list[FolderSeries]:
    """Every DICOM series under ``folder`` (recursively), in order of series UID."""
    found: dict[str, tuple[str, str, list[Path]]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        if "SeriesInstanceUID" not in header:
            continue
        modality = str(header.get("Modality", ""))
        description = str(header.get("SeriesDescription", ""))
        entry = found.setdefault(str(header.SeriesInstanceUID), (modality, description, []))
        entry[2].append(path)
    return [
        FolderSeries(uid, modality, description, tuple(files))
        for uid, (modality, description, files) in sorted(found.items())
    ]


def ct_series_files(folder: Path, series_uid: str | None = None) -> list[Path]:
    """The files of the one CT series under ``folder``, or of ``series_uid``.

    Raises ``SeriesChoiceError`` when ``folder`` does not exist or is not a folder, when it
    holds no CT series (or none with ``series_uid``), or several and no ``series_uid``: its
    message lists each series (UID, description, images).
    """
    folder = Path(folder)
    if not folder.exists():
        raise SeriesChoiceError(f"{folder} does not exist")
    if not folder.is_dir():
        raise SeriesChoiceError(f"{folder} is not a folder (give the folder holding the CT "
                                "series' files)")
    every = series_in_folder(folder)
    ct = [series for series in every if series.modality == "CT"]
    if series_uid is not None:
        chosen = [series for series in ct if series.series_uid == series_uid]
        if chosen:
            return list(chosen[0].files)
        raise SeriesChoiceError(
            f"{folder} holds no CT series with UID {series_uid}" + _listing(every)
        )
    if len(ct) == 1:
        return list(ct[0].files)
    if not ct:
        raise SeriesChoiceError(f"{folder} holds no CT series" + _listing(every))
    raise SeriesChoiceError(
        f"{folder} holds {len(ct)} CT series; choose one with --series-uid UID:"
        + "".join(f"\n  {series.line()}" for series in ct)
    )


def _listing(every: list[FolderSeries]) -> str:
    if not every:
        return " (no DICOM series at all)"
    return "; it holds:" + "".join(f"\n  {series.line()}" for series in every)
