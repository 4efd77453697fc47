"""Routing end to end: DCMTK storescu -> ``rtcontour serve`` with a routes file -> two
DCMTK storescp destinations; ignored series stay visible with their reasons; a malformed
routes file stops the start; ``rtcontour routes check`` explains a decision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import (
    StoreScp,
    api_job,
    serve_env,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)
from tests.worker.conftest import dciodvfy_errors

ROUTES = """
routes:
  - name: head-and-neck
    match:
      calling_ae: "TPS"
      series_description: ".*(h&n|head|neck).*"
    model: {model}
    destinations: ["{first}", "{second}"]
  - name: pelvis-not-supported
    match: {{series_description: ".*pelvis.*"}}
    action: ignore
default: ignore
"""


@pytest.fixture
def destinations(tmp_path: Path) -> list[StoreScp]:
    import shutil

    if shutil.which("storescp") is None:
        pytest.skip("DCMTK storescp is not installed (apt-get install dcmtk)")
    peers = [StoreScp(tmp_path / "tps", "TPS").start(), StoreScp(tmp_path / "aria", "ARIA").start()]
    yield peers
    for peer in peers:
        peer.stop()


def _routes_file(tmp_path: Path, package: Path, peers: list[StoreScp]) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(model=package.name.rsplit("-", 1)[0],
                                  first=peers[0].destination, second=peers[1].destination))
    return path


def test_routes_decide_what_is_contoured_and_where_it_goes(
    tmp_path: Path, destinations: list[StoreScp], serve_factory, test_package: Path
) -> None:
    routes = _routes_file(tmp_path, test_package, destinations)
    env = serve_env(tmp_path / "var", extra={
        "RTCONTOUR_ROUTES_FILE": str(routes),
        "RTCONTOUR_MODEL_PACKAGES_DIR": str(test_package.parent),
    })
    serve = serve_factory(env)
    head = write_phantom_series(tmp_path / "head", series_description="Head and neck 2mm", seed=1)
    pelvis = write_phantom_series(tmp_path / "pelvis", series_description="Pelvis 3mm", seed=2)
    other = write_phantom_series(tmp_path / "other", series_description="Head 2mm", seed=3)

    storescu(serve.dicom_port, head, calling_ae="TPS")
    storescu(serve.dicom_port, pelvis, calling_ae="TPS")
    storescu(serve.dicom_port, other, calling_ae="SCANNER")

    finished = {"done", "failed", "send_failed", "ignored"}
    jobs = wait_for_jobs(serve, 3, timeout_s=240, states=finished)
    by_series = {job["series_instance_uid"]: api_job(serve, job["id"]) for job in jobs}
    series_uid = {name: str(pydicom.dcmread(files[0]).SeriesInstanceUID)
                  for name, files in (("head", head), ("pelvis", pelvis), ("other", other))}

    contoured = by_series[series_uid["head"]]
    assert contoured["state"] == "done", contoured
    assert contoured["route_name"] == "head-and-neck"
    assert contoured["model_name"] == "tiny-test" and contoured["model_version"] == "0.0.1"
    assert contoured["destinations"] == [peer.destination for peer in destinations]
    assert [o["kind"] for o in contoured["outputs"]] == ["RTSTRUCT"]
    for peer in destinations:  # each destination of the route got the RTSTRUCT
        (received,) = wait_until(lambda peer=peer: peer.received(), 20, f"{peer.ae_title} RS")
        assert pydicom.dcmread(received).SOPInstanceUID == contoured["rtstruct_sop_instance_uid"]
        assert dciodvfy_errors(received) == []

    ignored = {
        "pelvis": "route pelvis-not-supported: ignore",
        "other": "no route matched",
    }
    for name, reason in ignored.items():
        job = by_series[series_uid[name]]
        assert job["state"] == "ignored", job
        assert job["ignored_reason"] == reason and job["outputs"] == []
        assert job["route_name"] == ("pelvis-not-supported" if name == "pelvis" else None)
    assert all(len(peer.received()) == 1 for peer in destinations)  # nothing sent for them

    listed = httpx.get(f"{serve.api_url}/api/jobs", params={"state": "ignored"},
                       headers=serve.headers(), timeout=10).json()
    assert {item["ignored_reason"] for item in listed["items"]} == set(ignored.values())
    explained = httpx.get(f"{serve.api_url}/api/routes",
                          params={"job_id": by_series[series_uid["other"]]["id"]},
                          headers=serve.headers(), timeout=10).json()
    assert explained["decision"]["reason"] == "no route matched"
    assert explained["decision"]["trials"][0]["why"] == "calling_ae 'SCANNER' does not match 'TPS'"
    # The explanation shows the series' attributes (they can name the patient): audited.
    viewed = httpx.get(f"{serve.api_url}/api/audit", params={"event": "patient.viewed"},
                       headers=serve.headers(), timeout=10).json()["items"]
    assert any(event["detail"]["job_ids"] == by_series[series_uid["other"]]["id"]
               for event in viewed)


def _rtcontour(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtcontour.service.cli", *args],
                          capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).parents[1])


def test_malformed_routes_file_stops_serve_with_a_sentence(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text('routes:\n  - name: hn\n    match: {calling_ae: "TPS("}\n')
    env = serve_env(tmp_path / "var", extra={"RTCONTOUR_ROUTES_FILE": str(routes)})
    result = _rtcontour(["serve"], env)
    assert result.returncode == 2
    assert (f"rtcontour serve: routes file {routes}: route 'hn', field match: calling_ae: "
            "'TPS(' is not a regular expression") in result.stderr
    assert "Traceback" not in result.stderr


def test_route_naming_a_package_that_is_not_installed_stops_the_worker(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  - name: hn\n    model: no-such-model\n")
    env = serve_env(tmp_path / "var", extra={"RTCONTOUR_ROUTES_FILE": str(routes),
                                            "RTCONTOUR_MODEL_PACKAGES_DIR": str(tmp_path)})
    result = _rtcontour(["worker"], env)
    assert result.returncode == 2
    assert "route 'hn', field model: model package 'no-such-model' is not installed" in (
        result.stderr)


def test_routes_check_explains_which_route_a_series_takes(
    tmp_path: Path, test_package: Path
) -> None:
    peers = [StoreScp(tmp_path / "a", "TPS", 10401), StoreScp(tmp_path / "b", "ARIA", 10402)]
    routes = _routes_file(tmp_path, test_package, peers)
    ct = write_phantom_series(tmp_path / "ct", series_description="Pelvis 3mm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")}
    env["RTCONTOUR_MODEL_PACKAGES_DIR"] = str(test_package.parent)
    result = _rtcontour(["routes", "check", str(ct[0].parent), "--routes", str(routes),
                         "--calling-ae", "TPS"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("no" in line and "head-and-neck: series_description 'Pelvis 3mm' does not match"
               in line for line in lines), result.stdout
    assert "MATCH  pelvis-not-supported" in result.stdout
    assert lines[-1] == "decision: route pelvis-not-supported: ignore -> ignore"
