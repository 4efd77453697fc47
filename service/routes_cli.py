"""``rtcontour routes check CT_DIR``: which route a series takes, and why earlier ones did not.

Reads the routing rules as the service would (``RTCONTOUR_ROUTES_FILE``, or ``--routes``),
validates them (models included), reads the first instance of the series in ``CT_DIR`` and
prints the decision. The association's AE titles are not in the files: give them with
``--calling-ae`` / ``--called-ae`` when routes match on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pydicom

from rtcontour.common.routes import match_keywords, series_attributes
from rtcontour.common.settings import Settings
from rtcontour.models.registry import load_checked_routing


def _first_instance(folder: Path, series_uid: str | None) -> pydicom.Dataset | None:
    """The first readable DICOM file of ``folder`` (recursively), of ``series_uid`` if given."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: S112 - not DICOM: skipped, the listener would refuse it
            continue
        if series_uid is None or str(dataset.get("SeriesInstanceUID", "")) == series_uid:
            return dataset
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rtcontour routes",
        description="Test the routing rules: say which route a CT series would take and why "
        "each earlier route did not match.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="explain the routing decision for a series folder")
    check.add_argument("ct_dir", type=Path, help="folder with the series' DICOM files")
    check.add_argument("--routes", type=Path, help="routes file (default RTCONTOUR_ROUTES_FILE)")
    check.add_argument("--calling-ae", default="", help="AE title of the sender, e.g. TPS")
    check.add_argument("--called-ae", default="", help="AE title the sender called")
    check.add_argument("--series-uid", help="the series to test when the folder holds several")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    args = parser.parse_args(argv)

    settings = Settings.model_validate({})
    if args.routes is not None:
        settings = settings.model_copy(update={"routes_file": args.routes})
    table = load_checked_routing(settings)
    first = _first_instance(args.ct_dir, args.series_uid)
    if first is None:
        print(f"rtcontour routes check: no DICOM instance under {args.ct_dir}", file=sys.stderr)
        return 2
    attributes = series_attributes(first, calling_ae=args.calling_ae, called_ae=args.called_ae,
                                   keywords=match_keywords(table))
    decision = table.decide(attributes)
    if args.json:
        print(json.dumps({**decision.as_dict(), "attributes": attributes}, indent=2))
        return 0
    print(f"routes: {table.source or 'none (implicit route: contour every series)'}")
    print("series: " + ", ".join(f"{key}={value!r}" for key, value in attributes.items() if value))
    for trial in decision.trials:
        print(f"  {'MATCH' if trial.matched else 'no   '}  {trial.route}: {trial.why}")
    outcome: str = decision.action
    route = decision.route
    if route is not None and decision.action == "contour":
        dose = str(first.get("Modality", "")) == "RTSTRUCT"
        model = ((route.dose_model or "the newest dose package") if dose
                 else (route.model or "the newest package"))
        where = ", ".join(route.destinations or []) or "RTCONTOUR_DESTINATIONS (" + (
            ", ".join(str(d) for d in settings.destinations) or "empty: sent nowhere") + ")"
        if dose:
            outcome = f"predict the dose with {model} and measure the clinicians' edits"
        else:
            outcome += f" with {model}"
        if route.review == "required" and not dose:
            outcome += (f"; review: required: held in awaiting_review, sent to {where} once a "
                        "clinician approves it")
        else:
            outcome += f", sent to {where}"
    print(f"decision: {decision.reason} -> {outcome}")
    return 0
