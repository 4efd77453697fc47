"""Structure names to TG-263 names, and pairing two structure sets by them.

Clinics name the same organ in many ways ("Brain Stem", "Cord", "Parotid Lt", "Oesophagus",
"Mandible"). :func:`to_tg263` gives the TG-263 name (AAPM Task Group 263, "Standardizing
nomenclatures in radiation oncology", 2018) of a name through

1. a clinic's own mapping (``extra``: clinic name -> TG-263 name), which takes precedence;
2. the built-in table :data:`TG263_SYNONYMS` for the seven organs rtcontour contours;
3. PTV names (``PTV70``, ``PTV_High``), which are returned as they are.

Names are compared after :func:`normalise_name` (case, spaces, underscores and hyphens
ignored), so ``"Parotid_Lt"``, ``"parotid lt"`` and ``"PAROTID-LT"`` are one name. Names of
sub-structures and margins (``"SpinalCord_PRV05"``, ``"Larynx_Glottic"``) are not synonyms and
stay unmatched. :func:`load_name_mapping` reads a clinic's mapping from a YAML or JSON file;
:class:`NameMappingFile` keeps it read, and reads it again only when the file changes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from rtcontour.common.errors import ConfigurationError

__all__ = [
    "TG263_SYNONYMS",
    "normalise_name",
    "to_tg263",
    "match_structures",
    "load_name_mapping",
    "NameMappingFile",
]

_SEPARATORS = re.compile(r"[\s_\-]+")


def _sided(organ: str, side_words: Sequence[str], forms: Sequence[str]) -> tuple[str, ...]:
    """Every ``form`` (with ``{organ}`` and ``{side}``) for every way of writing the side."""
    return tuple(form.format(organ=organ, side=side) for side in side_words for form in forms)


_LEFT = ("L", "Lt", "Left")
_RIGHT = ("R", "Rt", "Right")
_SIDED_FORMS = ("{organ} {side}", "{side} {organ}", "{organ} Gland {side}", "{side} {organ} Gland")

# TG-263 name -> other names clinics and data sets (OpenKBP: "LeftParotid", "Mandible") use.
TG263_SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "Brainstem": ("Brain Stem", "Brain_Stem", "BrainStem", "Tronc cerebral", "Hirnstamm"),
    "SpinalCord": ("Spinal Cord", "Spinal_Cord", "Cord", "Myelon", "Medulla Spinalis"),
    "Parotid_L": (*_sided("Parotid", _LEFT, _SIDED_FORMS), "Parotid_Left", "LeftParotid"),
    "Parotid_R": (*_sided("Parotid", _RIGHT, _SIDED_FORMS), "Parotid_Right", "RightParotid"),
    "Esophagus": ("Oesophagus",),
    "Larynx": ("Larynx",),
    "Bone_Mandible": ("Mandible", "Mandibula", "Mandible Bone"),
}


def normalise_name(name: str) -> str:
    """``name`` lower-case, without surrounding or inner spaces, underscores and hyphens."""
    return _SEPARATORS.sub("", name.strip().lower())


def _builtin_lookup() -> dict[str, str]:
    table: dict[str, str] = {}
    for tg263, synonyms in TG263_SYNONYMS.items():
        for synonym in (tg263, *synonyms):
            table[normalise_name(synonym)] = tg263
    return table


_BUILTIN: dict[str, str] = _builtin_lookup()


def to_tg263(name: str, extra: Mapping[str, str] | None = None) -> str | None:
    """The TG-263 name of structure ``name``, or ``None`` when neither table knows it.

    ``extra`` (clinic name -> TG-263 name) is tried first; its target is itself looked up in
    the built-in table, so a mapping to ``"Parotid Lt"`` still gives ``"Parotid_L"``. A PTV
    (a name starting with ``PTV``, any case) is returned unchanged.

    >>> to_tg263("Lt Parotid"), to_tg263("parotid_rt"), to_tg263("PTV70"), to_tg263("Brain")
    ('Parotid_L', 'Parotid_R', 'PTV70', None)
    >>> to_tg263("Stamm", extra={"stamm": "Brainstem"})
    'Brainstem'
    """
    key = normalise_name(name)
    if extra:
        clinic = {normalise_name(source): target for source, target in extra.items()}
        if key in clinic:
            target = clinic[key]
            return _BUILTIN.get(normalise_name(target), target)
    if key in _BUILTIN:
        return _BUILTIN[key]
    if key.startswith("ptv"):
        return name
    return None


def _pairing_key(name: str, extra: Mapping[str, str] | None) -> str:
    # Names neither table knows still pair with the same name written differently.
    return normalise_name(to_tg263(name, extra) or name)


def match_structures(
    auto_names: Iterable[str],
    reference_names: Iterable[str],
    extra: Mapping[str, str] | None = None,
) -> list[tuple[str | None, str | None]]:
    """Pair rtcontour's structure names with a reference structure set's names.

    Two names pair when they have the same TG-263 name (:func:`to_tg263` with ``extra``), or,
    where neither table knows them, the same :func:`normalise_name`. Each name pairs at most
    once: of several reference names for one organ the one spelled exactly like the auto
    name, else the first, is taken, and the others are left over.

    Returns ``(auto_name, reference_name)`` pairs: matched pairs and ``(auto_name, None)``
    (deleted: not in the reference) in ``auto_names`` order, then ``(None, reference_name)``
    (added: only in the reference) in ``reference_names`` order.

    >>> match_structures(["Brainstem", "Parotid_L", "Larynx"],
    ...                  ["Brain Stem", "Lt Parotid", "PTV70"])
    [('Brainstem', 'Brain Stem'), ('Parotid_L', 'Lt Parotid'), ('Larynx', None), (None, 'PTV70')]
    """
    references = list(reference_names)
    keys = [_pairing_key(name, extra) for name in references]
    taken = [False] * len(references)
    pairs: list[tuple[str | None, str | None]] = []
    for auto_name in auto_names:
        key = _pairing_key(auto_name, extra)
        candidates = [index for index, ref_key in enumerate(keys)
                      if ref_key == key and not taken[index]]
        exact = [index for index in candidates if references[index] == auto_name]
        if not candidates:
            pairs.append((auto_name, None))
            continue
        chosen = (exact or candidates)[0]
        taken[chosen] = True
        pairs.append((auto_name, references[chosen]))
    pairs.extend((None, name) for name, used in zip(references, taken, strict=True) if not used)
    return pairs


def load_name_mapping(path: Path | str) -> dict[str, str]:
    """A clinic's name mapping (clinic name -> TG-263 name) from a YAML or JSON file.

    The file holds one mapping of strings to strings, e.g. ``{"Parotide G": "Parotid_L"}``.
    Raises :class:`ConfigurationError` naming the file and the entry when it is not that, or
    when two of its names are one name after :func:`normalise_name` but map differently.
    """
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"structure name mapping {path} cannot be read: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigurationError(
            f"structure name mapping {path} must be a mapping of clinic name to TG-263 name, "
            f"not {type(loaded).__name__}")
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for source, target in loaded.items():
        if not isinstance(source, str) or not isinstance(target, str) or not target.strip():
            raise ConfigurationError(
                f"structure name mapping {path}: entry {source!r}: {target!r} is not "
                "a name mapped to a TG-263 name")
        key = normalise_name(source)
        if key in seen and mapping[seen[key]] != target:
            raise ConfigurationError(
                f"structure name mapping {path}: {seen[key]!r} and {source!r} are the same "
                f"name but map to {mapping[seen[key]]!r} and {target!r}")
        seen[key] = source
        mapping[source] = target
    return mapping


class NameMappingFile:
    """A clinic's name mapping file (:func:`load_name_mapping`), read at the first
    :meth:`mapping` and read again only when the file changed since (another modification
    time, size or inode: edited in place or replaced), so a long-running worker neither
    re-reads it for every job nor misses an edit. Thread-safe.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._mapping: dict[str, str] = {}

    def mapping(self) -> dict[str, str]:
        """The mapping as the file holds it now (a copy); raises :class:`ConfigurationError`
        like :func:`load_name_mapping` when the file is missing or invalid."""
        try:
            stat = self.path.stat()
        except OSError:
            return load_name_mapping(self.path)  # raises the sentence naming the file
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._mapping = load_name_mapping(self.path)
                self._stamp = stamp
            return dict(self._mapping)
