"""The README is the operator's manual: every setting and the two first commands are in it."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from rtcontour.common.settings import Settings
from tests.conftest import REPO_ROOT, free_port, real_package, serve_env, write_phantom_series

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_setting() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        f"RTCONTOUR_{name.upper()}"
        for name in Settings.model_fields
        if f"RTCONTOUR_{name.upper()}" not in text
    ]
    assert not missing, f"settings not documented in README.md: {', '.join(missing)}"


def test_readme_opens_with_the_serve_and_test_commands() -> None:
    opening = "\n".join(README.read_text(encoding="utf-8").splitlines()[:10])
    assert "make serve" in opening
    assert "make test" in opening


def _quick_start_block() -> list[str]:
    """The command lines of the quick start's "Send a CT and receive the RTSTRUCT" block."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index("Send a CT and receive the RTSTRUCT"):]
    block = after[after.index("```sh\n") + len("```sh\n"):]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_readme_quick_start_sends_a_ct_and_receives_the_rtstruct_as_written(
    tmp_path: Path,
) -> None:
    """The quick start's commands, line by line as a person types them, in an empty folder
    holding ``./my_ct/``; only the ports (free ones, not 11112/11113), the data folder (not the
    checkout's ``./var``) and ``make``'s folder (``-C`` the checkout) differ."""
    needed = ("storescp", "storescu", "make")
    if any(shutil.which(tool) is None for tool in needed):
        pytest.skip(f"needs {', '.join(needed)} (DCMTK, make)")
    if subprocess.run(["make", "-q", ".stamps/venv"], cwd=REPO_ROOT).returncode != 0:
        pytest.skip("checkout not set up: run 'make install' first (make serve would install)")
    if real_package() is None:
        pytest.skip("no model package under models/packages (the quick start's default)")
    env = serve_env(tmp_path / "var")
    dicom_port, tps_port = int(env["RTCONTOUR_DICOM_PORT"]), free_port()
    write_phantom_series(tmp_path / "my_ct", (24, 64, 64))
    started: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "quick-start.log"
    try:
        for line in _quick_start_block():
            command = re.sub(r"\s+#.*$", "", line).strip()
            command = command.replace("11113", str(tps_port)).replace("11112", str(dicom_port))
            command = re.sub(r"\bmake serve\b", f"make -C {REPO_ROOT} serve", command)
            if not command.endswith("&"):
                result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                        capture_output=True, timeout=120)
                assert result.returncode == 0, f"{line!r} failed: {result.stderr!r}"
                continue
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    ["bash", "-c", command.rstrip("& ")], cwd=tmp_path, env=env, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            started.append(process)
            ready = (lambda: _listening(tps_port)) if "storescp" in command else (
                lambda: "rtcontour serving:" in log_path.read_text(errors="replace"))
            deadline = time.monotonic() + 60
            while not ready() and time.monotonic() < deadline:
                assert process.poll() is None, (
                    f"{line!r} stopped:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.25)
            assert ready(), f"{line!r} not ready:\n{log_path.read_text(errors='replace')[-3000:]}"

        deadline = time.monotonic() + 180
        received: list[Path] = []
        while not received and time.monotonic() < deadline:
            received = [p for p in (tmp_path / "received").glob("*") if p.is_file()]
            time.sleep(0.5)
        assert received, f"no RTSTRUCT received:\n{log_path.read_text(errors='replace')[-5000:]}"
        time.sleep(0.5)  # storescp renames the file once written
        assert pydicom.dcmread(received[0]).Modality == "RTSTRUCT"
    finally:
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_readme_says_make_serve_needs_no_root_and_the_makefile_agrees() -> None:
    text = README.read_text(encoding="utf-8")
    quick_start = text[text.index("## Quick start"): text.index("## Commands")]
    assert "needs no root" in quick_start and "for the Debian packages" not in quick_start
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    serve_rule = re.search(r"^serve:(.*)$", makefile, re.MULTILINE)
    assert serve_rule is not None and "apt" not in serve_rule.group(1)


def _routing_example() -> str:
    """The YAML block of the README's "Routing rules" section, as written."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Routing rules"):]
    return section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml"))]


@pytest.mark.parametrize(
    ("modality", "series_description", "study_description", "route", "action"),
    [("CT", "CT 2.5mm", "RT HEAD NECK PLANNING", "head-and-neck", "contour"),
     ("CT", "Axial 3.0 Std", "H&N RT Planning", "head-and-neck", "contour"),
     ("RTSTRUCT", "Approved structures", "RT HEAD NECK PLANNING", "approved-structure-sets",
      "contour"),
     ("CT", "CT 2.5mm", "RT PROSTATE PLANNING", "pelvis-not-supported", "ignore"),
     ("CT", "CT 2.5mm", "THORAX", None, "ignore")],
    ids=["hn-ct", "hn-ct-ampersand", "approved-structure-set", "prostate-ct", "thorax-ct"],
)
def test_readme_routing_example_loads_as_written_and_routes_realistic_series(
    modality: str, series_description: str, study_description: str, route: str | None,
    action: str,
) -> None:
    import yaml
    from pydicom.dataset import Dataset

    from rtcontour.common.routes import parse_routing, series_attributes
    from rtcontour.models.registry import check_routes_models

    table = parse_routing(yaml.safe_load(_routing_example()), "README.md")
    # Every model the example names is installed with rtcontour.
    assert "rtcontour-hn-oar" in check_routes_models(Settings(), table)
    first = Dataset()
    first.Modality, first.SeriesDescription = modality, series_description
    first.StudyDescription = study_description
    decision = table.decide(series_attributes(first, calling_ae="TPS", called_ae="RTCONTOUR"))
    assert (decision.route_name, decision.action) == (route, action)
    if route == "head-and-neck":
        assert decision.route is not None and decision.route.review == "required"
    if route == "approved-structure-sets":
        assert decision.route is not None and decision.route.dose_model == "rtcontour-hn-dose"
