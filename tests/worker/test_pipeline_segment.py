"""``rtcontour segment``: a CT folder in, an RTSTRUCT file out, offline."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from rtcontour.worker.segment import main
from tests.conftest import referenced_ct_uids, sop_uids, write_phantom_series
from tests.worker.conftest import dciodvfy_errors


def test_segment_writes_valid_rtstruct_referencing_every_ct(
    tmp_path: Path, test_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct_files = write_phantom_series(tmp_path / "ct", (20, 64, 64))
    out = tmp_path / "RS.dcm"
    assert main([str(tmp_path / "ct"), "--out", str(out), "--model", str(test_package)]) == 0
    assert dciodvfy_errors(out) == []
    assert referenced_ct_uids(out) == sop_uids(ct_files)
    assert pydicom.dcmread(out).Modality == "RTSTRUCT"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "inference" in printed


def test_segment_refuses_a_too_short_series_with_its_reason(
    tmp_path: Path, test_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_phantom_series(tmp_path / "ct", (3, 32, 32))
    code = main([str(tmp_path / "ct"), "--out", str(tmp_path / "RS.dcm"), "--model",
                 str(test_package)])
    assert code == 2
    assert "series refused" in capsys.readouterr().err
    assert not (tmp_path / "RS.dcm").exists()


def test_segment_reports_a_missing_model_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_phantom_series(tmp_path / "ct", (12, 32, 32))
    code = main([str(tmp_path / "ct"), "--out", str(tmp_path / "RS.dcm"), "--model",
                 str(tmp_path / "nope")])
    assert code == 3
    assert "model package problem" in capsys.readouterr().err


def test_segment_on_a_folder_of_two_series_lists_each_and_contours_the_one_chosen(
    tmp_path: Path, test_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = write_phantom_series(tmp_path / "ct" / "a", (12, 32, 32), series_uid="1.2.826.0.1.11",
                                series_description="Head 2mm")
    write_phantom_series(tmp_path / "ct" / "b", (14, 32, 32), series_uid="1.2.826.0.1.22",
                         series_description="Head 3mm", seed=1)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    argv = [str(tmp_path / "ct"), "--out", str(tmp_path / "RS.dcm"), "--model", str(test_package)]

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds 2 CT series; choose one with --series-uid" in err
    assert "1.2.826.0.1.11  'Head 2mm'  12 images" in err
    assert "1.2.826.0.1.22  'Head 3mm'  14 images" in err
    assert not (tmp_path / "RS.dcm").exists()

    assert main([*argv, "--series-uid", "1.2.826.0.1.11"]) == 0
    assert referenced_ct_uids(tmp_path / "RS.dcm") == sop_uids(head)


def test_segment_with_an_unknown_series_uid_lists_what_the_folder_holds(
    tmp_path: Path, test_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_phantom_series(tmp_path / "ct", (12, 32, 32), series_uid="1.2.826.0.1.11",
                         series_description="Head")
    code = main([str(tmp_path / "ct"), "--out", str(tmp_path / "RS.dcm"), "--model",
                 str(test_package), "--series-uid", "9.9.9"])
    assert code == 2
    err = capsys.readouterr().err
    listing = "holds no CT series with UID 9.9.9; it holds:\n  1.2.826.0.1.11  'Head'  12 images"
    assert listing in err


def test_segment_on_a_folder_that_does_not_exist_says_so(
    tmp_path: Path, test_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "my_ct"
    code = main([str(missing), "--out", str(tmp_path / "RS.dcm"), "--model", str(test_package)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err
    assert "holds no CT series" not in err


@pytest.mark.parametrize(
    ("argv_tail", "named", "not_named"),
    [(["--otu", "RS.dcm"], "unrecognized arguments: --otu RS.dcm (--otu: did you mean --out?)",
      "required"),
     ([], "the following arguments are required: --out", "unrecognized")],
    ids=["misspelled-out", "out-missing"],
)
def test_segment_names_a_misspelled_option_before_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], named: str,
    not_named: str,
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), *argv_tail])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and not_named not in err
