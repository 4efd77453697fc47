"""The distribution a clinic installs: the wheel and sdist built for real, the wheel installed
in a fresh virtual environment outside the checkout, and used from other directories.

One import name: the wheel's only top-level package is ``rtcontour`` (a PEP 420 namespace over
``rtcontour.common``, ``.models``, ``.worker`` and ``.service``), so a stray ``models.py`` or
``common.py`` in the current directory, or another distribution's ``models`` package, is
never imported in place of ours. The model packages travel inside the wheel as package data,
and ``rtcontour segment`` finds the newest of them without a checkout.

Building takes seconds; installing the wheel's dependencies into the fresh venv takes about
a minute from the package index (one module-scoped fixture; skipped with the reason when the
index cannot be reached). The train extra (torch) is not installed: inference needs ONNX
Runtime or OpenVINO only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import REPO_ROOT, sop_uids, write_phantom_series

pytestmark = [pytest.mark.distribution, pytest.mark.timeout(900)]

# The folders the project installs, under their installed names.
SUBPACKAGES = ("common", "models", "worker", "service")
# Files that stand where the folders stand and must never be imported by ``rtcontour``'s code.
STRAY_MODULES = ("models.py", "common.py", "worker.py", "service.py")
# The extras' modules: a runtime install without them may lack exactly these.
TRAIN_EXTRA_MODULES = frozenset({"torch", "onnx"})
# pip's words for "the package index cannot be reached" (not for a dependency that is wrong).
_OFFLINE = re.compile(
    r"Temporary failure in name resolution|Failed to establish a new connection|"
    r"Network is unreachable|Name or service not known|Could not fetch URL|"
    r"Max retries exceeded|Read timed out|ProxyError|No route to host",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Built:
    """What one build of the source tree gave."""

    source: Path  # the copy of the checkout that was built
    wheel: Path  # built from the source tree
    sdist: Path
    wheel_from_sdist: Path


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout's venv, paths or rtcontour settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("RTCONTOUR_")
        and key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    }
    env.update(extra)
    return env


def _run(argv: list[str | Path], cwd: Path, *, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env or _clean_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _copy_source_tree(destination: Path) -> Path:
    """The files of the checkout that git would ship (tracked and not ignored), copied, so
    the build neither writes into the checkout nor sees its venv, caches or runs."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=False,
    )
    if listed.returncode == 0:
        for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
            source = REPO_ROOT / name
            if source.is_file():  # tracked but deleted in the work tree: not shipped
                target = destination / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    else:  # not a git checkout (an unpacked sdist, an image): everything but the local state
        shutil.copytree(REPO_ROOT, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "var", "runs", "__pycache__", "*.egg-info",
            ".*_cache", ".stamps", "*.pt"))
    return destination


def _build(argv: list[str], source: Path, out: Path) -> None:
    # --no-isolation: the build runs with this venv's setuptools, not one fetched per build.
    result = _run([sys.executable, "-m", "build", "--no-isolation", *argv, "--outdir", out,
                   source], cwd=source.parent, timeout=600)
    assert result.returncode == 0, f"python -m build {argv} failed:\n{result.stdout[-4000:]}" \
                                   f"\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The wheel built from the source tree, and the sdist with the wheel built from it."""
    root = tmp_path_factory.mktemp("distribution")
    source = _copy_source_tree(root / "rtcontour-src")
    _build(["--wheel"], source, root / "from-tree")
    _build([], source, root / "from-sdist")  # no --sdist/--wheel: the sdist, then its wheel
    (wheel,) = (root / "from-tree").glob("rtcontour-*.whl")
    (sdist,) = (root / "from-sdist").glob("rtcontour-*.tar.gz")
    (wheel_from_sdist,) = (root / "from-sdist").glob("rtcontour-*.whl")
    return Built(source, wheel, sdist, wheel_from_sdist)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv outside the checkout with the wheel installed
    (its runtime dependencies from the package index; no extra)."""
    venv = tmp_path_factory.mktemp("clinic") / "venv"
    assert not venv.resolve().is_relative_to(REPO_ROOT.resolve())
    made = _run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / "bin"
    pip = _run([bin_dir / "python", "-m", "pip", "install", "--disable-pip-version-check",
                "--no-input", "--progress-bar", "off", "--no-compile", built.wheel],
               cwd=venv.parent, timeout=900)
    if pip.returncode != 0:
        output = pip.stdout + pip.stderr
        offline = _OFFLINE.search(output)
        if offline:
            pytest.skip("the wheel's dependencies cannot be installed: the package index is "
                        f"unreachable ({offline[0]})")
        pytest.fail(f"pip install of the wheel failed:\n{output[-6000:]}")
    return bin_dir


def _members(wheel: Path) -> dict[str, str]:
    """Path in the wheel -> sha256 of its content."""
    with zipfile.ZipFile(wheel) as archive:
        return {name: hashlib.sha256(archive.read(name)).hexdigest()
                for name in archive.namelist() if not name.endswith("/")}


def _stray_cwd(tmp_path: Path) -> Path:
    """A working directory holding ``models.py``, ``common.py``, ... that exit loudly when
    imported (``python -c`` and ``python -m`` put the current directory first on sys.path)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in STRAY_MODULES:
        (cwd / name).write_text(f"raise SystemExit('the stray {name} in the current directory "
                                "was imported')\n")
    return cwd


def _newest_segmentation_package(wheel: Path) -> tuple[str, str]:
    """(name, version) of the newest segmentation model package in the wheel."""
    import json

    with zipfile.ZipFile(wheel) as archive:
        manifests = [json.loads(archive.read(name)) for name in archive.namelist()
                     if re.fullmatch(r"rtcontour/models/packages/[^/]+/manifest\.json", name)]
    segmentation = [m for m in manifests if m.get("kind", "segmentation") == "segmentation"]
    assert segmentation, "the wheel carries no segmentation model package"
    newest = max(segmentation, key=lambda m: tuple(int(p) for p in m["version"].split(".")))
    return str(newest["name"]), str(newest["version"])


def test_wheel_has_one_top_level_name_rtcontour(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["rtcontour"]
    dist_info = top_level.split("/")[0]
    assert {n.split("/")[0] for n in names} == {"rtcontour", dist_info}
    # rtcontour itself is a namespace (PEP 420): nothing but the four packages lies under it
    assert "rtcontour/__init__.py" not in names
    assert {n.split("/")[1] for n in names if n.startswith("rtcontour/")} == set(SUBPACKAGES)
    for package in SUBPACKAGES:
        assert f"rtcontour/{package}/__init__.py" in names


def test_wheel_carries_the_model_packages_and_dashboard_as_package_data(built: Built) -> None:
    members = _members(built.wheel)
    source_files = [p for p in sorted((built.source / "models" / "packages").rglob("*"))
                    if p.is_file()]
    assert any(p.name == "model.onnx" for p in source_files)
    for path in source_files:
        relative = path.relative_to(built.source / "models").as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert members.get(f"rtcontour/models/{relative}") == digest, relative
    for page in ("index.html", "dashboard.js", "dashboard.css"):
        assert f"rtcontour/service/api/static/{page}" in members


def test_sdist_builds_the_same_wheel_as_the_source_tree(built: Built) -> None:
    assert built.wheel.name == built.wheel_from_sdist.name
    from_tree, from_sdist = _members(built.wheel), _members(built.wheel_from_sdist)
    assert sorted(from_tree) == sorted(from_sdist)
    differing = sorted(n for n in from_tree if from_tree[n] != from_sdist[n])
    assert differing == []


def test_installed_rtcontour_help_runs_from_the_root_directory(installed: Path) -> None:
    result = _run([installed / "rtcontour", "--help"], cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert "usage: rtcontour COMMAND" in result.stdout
    for command in ("serve", "segment", "dose", "worker"):
        assert f"  {command}" in result.stdout
    segment_help = _run([installed / "rtcontour", "segment", "--help"], cwd=Path("/"))
    assert segment_help.returncode == 0, segment_help.stderr
    assert "--out" in segment_help.stdout


def test_installed_package_ignores_stray_models_and_common_in_the_current_directory(
    installed: Path, tmp_path: Path
) -> None:
    cwd = _stray_cwd(tmp_path)
    for where in (Path("/"), cwd):
        worker = _run([installed / "python", "-c", "import rtcontour.worker"], cwd=where)
        assert worker.returncode == 0, f"from {where}: {worker.stdout}{worker.stderr}"
    # Every module of the wheel, with the stray files first on sys.path: none is a bare import,
    # and only the train extra's modules may miss a package (torch is not installed).
    script = f"""
import importlib, importlib.util, pkgutil, sys
import rtcontour
assert importlib.util.find_spec("torch") is None, "torch is installed"
missing = {{}}
for module in pkgutil.walk_packages(rtcontour.__path__, "rtcontour."):
    try:
        importlib.import_module(module.name)
    except ModuleNotFoundError as error:
        missing[module.name] = error.name
assert set(missing.values()) <= set({sorted(TRAIN_EXTRA_MODULES)!r}), missing
bare = sorted(n for n in sys.modules if n.split(".")[0] in {list(SUBPACKAGES)!r})
assert not bare, bare
print(rtcontour.__path__[0])
"""
    everything = _run([installed / "python", "-c", script], cwd=cwd)
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert Path(everything.stdout.strip()).is_relative_to(installed.parent)


def test_installed_segment_contours_a_ct_series_with_the_packaged_model(
    built: Built, installed: Path, tmp_path: Path
) -> None:
    ct_files = write_phantom_series(tmp_path / "ct", (24, 64, 64))
    cwd = _stray_cwd(tmp_path)
    out = tmp_path / "RS.dcm"
    result = _run([installed / "rtcontour", "segment", tmp_path / "ct", "--out", out], cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    name, version = _newest_segmentation_package(built.wheel)
    assert f"model {name} {version}" in result.stdout
    rtstruct = pydicom.dcmread(out)
    assert rtstruct.Modality == "RTSTRUCT"
    assert rtstruct.ManufacturerModelName == name
    referenced = {
        image.ReferencedSOPInstanceUID
        for frame in rtstruct.ReferencedFrameOfReferenceSequence
        for study in frame.RTReferencedStudySequence
        for series in study.RTReferencedSeriesSequence
        for image in series.ContourImageSequence
    }
    assert referenced == sop_uids(ct_files)
    assert sorted(p.name for p in cwd.iterdir()) == sorted(STRAY_MODULES)  # nothing written


def _readme_library_example() -> str:
    """The Python block of the README's "Installing as a library" section."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Installing as a library\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's library section has no Python example"
    return match[1]


def test_readme_library_example_runs_with_the_installed_wheel(
    built: Built, installed: Path, tmp_path: Path
) -> None:
    cwd = _stray_cwd(tmp_path)
    ct_files = write_phantom_series(cwd / "my_ct", (24, 64, 64))
    (cwd / "example.py").write_text(_readme_library_example(), encoding="utf-8")
    result = _run([installed / "python", "example.py"], cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    rtstruct = pydicom.dcmread(cwd / "RS.dcm")
    assert rtstruct.Modality == "RTSTRUCT"
    assert rtstruct.ManufacturerModelName == _newest_segmentation_package(built.wheel)[0]
    assert len(rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
               .RTReferencedSeriesSequence[0].ContourImageSequence) == len(ct_files)
