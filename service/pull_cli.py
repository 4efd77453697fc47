"""``rtcontour pull``: pull a CT series from the PACS into the running rtcontour
(``service.pull``: C-FIND, the series a route would take, C-MOVE to our listener)."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
import time

from rtcontour.common.db import make_engine
from rtcontour.common.routes import load_routing
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.service.pull import InvalidQuery, Puller, PullError, PullNotConfigured, PullQuery


def main(argv: list[str] | None = None) -> int:
    """``rtcontour pull``: pull a CT series from the PACS into the running rtcontour."""
    parser = argparse.ArgumentParser(
        prog="rtcontour pull",
        description=(
            "Find a CT series on the PACS (RTCONTOUR_PACS=AET@host:port) and have rtcontour "
            "contour it as if the TPS had sent it: the PACS sends it to rtcontour's listener "
            "(C-MOVE to RTCONTOUR_AE_TITLE, which must be running: rtcontour serve). The job "
            "says it was pulled, and by whom."),
        epilog="Give the same RTCONTOUR_DATA_DIR / RTCONTOUR_DATABASE_URL as the service.")
    parser.add_argument("--accession", help="accession number of the study")
    parser.add_argument("--patient-id", help="patient ID")
    parser.add_argument("--study-uid", help="Study Instance UID")
    parser.add_argument("--series-uid", help="Series Instance UID")
    parser.add_argument("--wait-job", type=float, default=60.0, metavar="SECONDS",
                        help="wait this long for the job to appear (0: do not wait)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    try:
        query = PullQuery(patient_id=args.patient_id, accession_number=args.accession,
                          study_instance_uid=args.study_uid, series_instance_uid=args.series_uid)
    except InvalidQuery as exc:
        print(f"rtcontour pull: {exc}", file=sys.stderr)
        return 2
    settings = Settings.model_validate({})
    engine = make_engine(settings)
    create_schema(engine)
    puller = Puller(settings, engine, load_routing(settings))
    who = f"cli:{getpass.getuser()}"
    try:
        return _pull_and_report(puller, query, who, args.wait_job)
    finally:
        engine.dispose()


def _pull_and_report(puller: Puller, query: PullQuery, who: str, wait_job_s: float) -> int:
    try:
        pull = puller.pull(query, who, wait=True)
    except PullNotConfigured as exc:
        print(f"rtcontour pull: {exc}", file=sys.stderr)
        return 2
    except PullError as exc:
        print(f"rtcontour pull: {exc}", file=sys.stderr)
        return 1
    described = f"'{pull.series_description or 'no description'}' ({pull.series_instance_uid})"
    if pull.reason is not None:
        print(f"rtcontour pull: series {described}: {pull.reason}", file=sys.stderr)
        return 1
    print(f"pull {pull.id}: series {described} retrieved from {pull.pacs}: "
          f"{pull.retrieved_instances} instances")
    deadline = time.monotonic() + max(0.0, wait_job_s)
    while time.monotonic() < deadline:
        found = puller.store.get(pull.id)
        if found is not None and found.job_id:
            print(f"job {found.job_id} (pulled by {who})")
            return 0
        time.sleep(0.5)
    if wait_job_s > 0:
        print("the job has not appeared yet: see the dashboard (it becomes a job after the "
              "listener's quiet period)")
    return 0
