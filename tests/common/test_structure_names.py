"""TG-263 names from clinic names, and pairing an auto with an approved structure set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rtcontour.common import structure_names
from rtcontour.common.errors import ConfigurationError
from rtcontour.common.structure_names import (
    TG263_SYNONYMS,
    NameMappingFile,
    load_name_mapping,
    match_structures,
    normalise_name,
    to_tg263,
)

CLINIC_NAMES = [
    ("Brain Stem", "Brainstem"), ("BrainStem", "Brainstem"), ("BRAINSTEM", "Brainstem"),
    ("Cord", "SpinalCord"), ("Spinal Cord", "SpinalCord"), ("spinal_cord", "SpinalCord"),
    ("Parotid Lt", "Parotid_L"), ("Lt Parotid", "Parotid_L"), ("L Parotid", "Parotid_L"),
    ("Parotid_Left", "Parotid_L"), ("LeftParotid", "Parotid_L"), ("Parotid-L", "Parotid_L"),
    ("Parotid Rt", "Parotid_R"), ("Rt Parotid", "Parotid_R"), ("Right Parotid Gland", "Parotid_R"),
    ("Oesophagus", "Esophagus"), ("Esophagus", "Esophagus"),
    ("Mandible", "Bone_Mandible"), ("Bone_Mandible", "Bone_Mandible"),
    ("Larynx", "Larynx"), ("  larynx ", "Larynx"),
]


@pytest.mark.parametrize(("clinic_name", "tg263"), CLINIC_NAMES,
                         ids=[name.strip() for name, _ in CLINIC_NAMES])
def test_clinic_names_of_the_seven_organs_give_their_tg263_name(clinic_name, tg263):
    assert to_tg263(clinic_name) == tg263


def test_every_tg263_name_is_its_own_name_and_synonyms_do_not_collide():
    assert all(to_tg263(name) == name for name in TG263_SYNONYMS)
    owners: dict[str, str] = {}
    for tg263, synonyms in TG263_SYNONYMS.items():
        for synonym in (tg263, *synonyms):
            assert owners.setdefault(normalise_name(synonym), tg263) == tg263, synonym


@pytest.mark.parametrize("name", ["SpinalCord_PRV05", "Larynx_Glottic", "Parotids", "Brain",
                                  "zPTV70_opt", "CTV70"],
                         ids=["prv", "sub-structure", "both-parotids", "other-organ",
                              "optimisation-ptv", "ctv"])
def test_margins_sub_structures_and_unknown_names_have_no_tg263_name(name):
    assert to_tg263(name) is None


def test_ptvs_are_left_as_they_are():
    assert [to_tg263(name) for name in ("PTV70", "PTV_High", "ptv 5400cGy")] == [
        "PTV70", "PTV_High", "ptv 5400cGy"]


def test_a_clinic_mapping_takes_precedence_and_its_targets_are_normalised():
    extra = {"Stamm": "Brainstem", "Cord": "SpinalCord_PRV05", "PG links": "Parotid Lt",
             "Oral Cavity": "Cavity_Oral"}
    assert to_tg263("stamm", extra) == "Brainstem"
    assert to_tg263("CORD", extra) == "SpinalCord_PRV05"  # the clinic's Cord is a PRV
    assert to_tg263("PG_Links", extra) == "Parotid_L"
    assert to_tg263("Oral cavity", extra) == "Cavity_Oral"
    assert to_tg263("Cord") == "SpinalCord"


def test_an_approved_set_with_clinic_names_is_matched_structure_by_structure():
    auto = ["Brainstem", "SpinalCord", "Parotid_L", "Parotid_R", "Esophagus", "Larynx",
            "Bone_Mandible"]
    approved = ["BODY", "Brain Stem", "Cord", "Parotid Lt", "Parotid Rt", "Oesophagus",
                "Mandible", "PTV70", "SpinalCord_PRV05"]
    assert match_structures(auto, approved) == [
        ("Brainstem", "Brain Stem"), ("SpinalCord", "Cord"), ("Parotid_L", "Parotid Lt"),
        ("Parotid_R", "Parotid Rt"), ("Esophagus", "Oesophagus"), ("Larynx", None),
        ("Bone_Mandible", "Mandible"),
        (None, "BODY"), (None, "PTV70"), (None, "SpinalCord_PRV05"),
    ]


def test_each_name_pairs_once_preferring_the_exact_spelling():
    assert match_structures(["SpinalCord"], ["Cord", "SpinalCord"]) == [
        ("SpinalCord", "SpinalCord"), (None, "Cord")]
    assert match_structures(["Parotid_L", "Parotid_L"], ["L Parotid"]) == [
        ("Parotid_L", "L Parotid"), ("Parotid_L", None)]


def test_names_neither_table_knows_pair_when_written_alike_and_mapping_pairs_the_rest():
    assert match_structures(["Brain", "PTV_70"], ["BRAIN", "PTV 70"]) == [
        ("Brain", "BRAIN"), ("PTV_70", "PTV 70")]
    assert match_structures(["Parotid_L"], ["Parotide G"]) == [
        ("Parotid_L", None), (None, "Parotide G")]
    assert match_structures(["Parotid_L"], ["Parotide G"], {"Parotide G": "Parotid_L"}) == [
        ("Parotid_L", "Parotide G")]


def test_a_mapping_file_is_read_from_yaml_or_json(tmp_path: Path):
    yaml_file = tmp_path / "names.yaml"
    yaml_file.write_text("Parotide G: Parotid_L\n'Tronc': Brainstem\n", encoding="utf-8")
    json_file = tmp_path / "names.json"
    json_file.write_text('{"Moelle": "SpinalCord"}', encoding="utf-8")
    assert load_name_mapping(yaml_file) == {"Parotide G": "Parotid_L", "Tronc": "Brainstem"}
    assert load_name_mapping(json_file) == {"Moelle": "SpinalCord"}
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_name_mapping(empty) == {}


@pytest.mark.parametrize(("text", "message"), [
    ("- Parotid_L\n", "must be a mapping"),
    ("Parotide G: 3\n", "'Parotide G'"),
    ("Parotide G: Parotid_L\nparotide_g: Parotid_R\n", "are the same name"),
    ("a: [b\n", "cannot be read"),
], ids=["list", "number", "same-name-twice", "bad-yaml"])
def test_a_bad_mapping_file_is_refused_with_a_sentence(tmp_path: Path, text, message):
    path = tmp_path / "names.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=message):
        load_name_mapping(path)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths ``load_name_mapping`` reads from now on, in order."""
    reads: list[Path] = []
    real = structure_names.load_name_mapping

    def counting(path: Path | str) -> dict[str, str]:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(structure_names, "load_name_mapping", counting)
    return reads


def _touch_later(path: Path) -> None:
    """Move the file's modification time a second on (a coarse clock may not have moved)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_a_mapping_file_is_read_once_and_again_only_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "names.yaml"
    path.write_text("Parotide G: Parotid_L\n", encoding="utf-8")
    reads = _count_reads(monkeypatch)
    names = NameMappingFile(path)
    for _ in range(3):
        assert names.mapping() == {"Parotide G": "Parotid_L"}
    names.mapping()["Tronc"] = "Brainstem"  # a copy: the kept mapping is not changed
    assert names.mapping() == {"Parotide G": "Parotid_L"}
    assert len(reads) == 1

    path.write_text("Parotide G: Parotid_L\nTronc: Brainstem\n", encoding="utf-8")
    _touch_later(path)
    assert names.mapping() == {"Parotide G": "Parotid_L", "Tronc": "Brainstem"}
    assert names.mapping() == {"Parotide G": "Parotid_L", "Tronc": "Brainstem"}
    assert len(reads) == 2

    replacement = tmp_path / "names.yaml.new"  # written aside and renamed over it
    replacement.write_text("Moelle: SpinalCord\n", encoding="utf-8")
    os.replace(replacement, path)
    assert names.mapping() == {"Moelle": "SpinalCord"}
    assert len(reads) == 3


def test_a_mapping_file_that_turns_bad_or_goes_is_refused_with_a_sentence(tmp_path: Path):
    path = tmp_path / "names.yaml"
    path.write_text("Parotide G: Parotid_L\n", encoding="utf-8")
    names = NameMappingFile(path)
    assert names.mapping() == {"Parotide G": "Parotid_L"}
    path.write_text("- Parotid_L\n", encoding="utf-8")
    _touch_later(path)
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        names.mapping()
    path.unlink()
    with pytest.raises(ConfigurationError, match="cannot be read"):
        names.mapping()
