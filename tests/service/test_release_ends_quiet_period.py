"""RTCONTOUR_RELEASE_ENDS_QUIET_PERIOD: a series from a listed sender becomes a job when every
association that carried it is released; by default, and for any other sender, only after the
quiet period. The arrival says how long the quiet period held it after the release."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtcontour.common.settings import Settings
from rtcontour.service.spool import InstanceSpool, SeriesTracker
from tests.service.conftest import FakeClock, RecordingSink, instance_header

SERIES_A = "1.2.3.4.100"
QUIET_S = 5.0


def _tracker(tmp_path: Path, sink: RecordingSink, clock: FakeClock,
             release_ends_quiet: frozenset[str] = frozenset()) -> SeriesTracker:
    spool = InstanceSpool(tmp_path, min_free_disk_bytes=0)
    return SeriesTracker(sink, spool, quiet_period_s=QUIET_S, clock=clock,
                         release_ends_quiet=release_ends_quiet)


def _store(tracker: SeriesTracker, association: int, first_sop: int, n: int = 3,
           calling_ae: str = "TPS") -> None:
    for sop in range(first_sop, first_sop + n):
        tracker.instance_stored(association, instance_header(SERIES_A, sop), calling_ae)


def test_by_default_a_released_series_waits_for_the_quiet_period_and_reports_it(tmp_path):
    sink, clock = RecordingSink(), FakeClock()
    tracker = _tracker(tmp_path, sink, clock)
    _store(tracker, 1, 0)
    clock.advance(1.0)
    tracker.association_released(1)
    assert tracker.poll() == []
    clock.advance(QUIET_S - 1.0)  # the quiet period runs from the last instance
    [arrival] = tracker.poll()
    assert arrival.quiet_s == pytest.approx(QUIET_S - 1.0)


@pytest.mark.parametrize("listed", [frozenset({"TPS"}), frozenset({"*"})], ids=["ae", "any"])
def test_a_listed_sender_s_series_is_handed_over_at_its_release(tmp_path, listed):
    sink, clock = RecordingSink(), FakeClock()
    tracker = _tracker(tmp_path, sink, clock, listed)
    _store(tracker, 1, 0)
    assert tracker.poll() == []  # still open: never before the release
    tracker.association_released(1)
    [arrival] = tracker.poll()
    assert arrival.series_instance_uid == SERIES_A and arrival.quiet_s == pytest.approx(0.0)


def test_another_sender_still_waits_for_the_quiet_period(tmp_path):
    sink, clock = RecordingSink(), FakeClock()
    tracker = _tracker(tmp_path, sink, clock, frozenset({"TPS"}))
    _store(tracker, 1, 0, calling_ae="SCANNER")
    tracker.association_released(1)
    assert tracker.poll() == []
    clock.advance(QUIET_S)
    assert len(tracker.poll()) == 1


def test_a_series_still_open_on_a_second_association_waits_for_that_release(tmp_path):
    sink, clock = RecordingSink(), FakeClock()
    tracker = _tracker(tmp_path, sink, clock, frozenset({"TPS"}))
    _store(tracker, 1, 0)
    _store(tracker, 2, 3)
    tracker.association_released(1)
    assert tracker.poll() == []
    tracker.association_released(2)
    assert len(tracker.poll()) == 1 and len(sink.arrivals) == 1


def test_the_unsafe_case_a_series_split_across_associations_becomes_two_arrivals(tmp_path):
    """Why it is off by default: a sender that opens one association after another for one
    series has its first part handed over alone (the quiet period would have joined them)."""
    sink, clock = RecordingSink(), FakeClock()
    tracker = _tracker(tmp_path, sink, clock, frozenset({"TPS"}))
    _store(tracker, 1, 0)
    tracker.association_released(1)
    assert len(tracker.poll()) == 1
    clock.advance(0.5)
    _store(tracker, 2, 3)
    tracker.association_released(2)
    assert len(tracker.poll()) == 1 and len(sink.arrivals) == 2


def test_the_setting_takes_a_comma_list_of_ae_titles_and_refuses_a_bad_one():
    settings = Settings(release_ends_quiet_period="TPS, ECLIPSE")  # type: ignore[arg-type]
    assert settings.release_ends_quiet_period == ["TPS", "ECLIPSE"]
    assert Settings().release_ends_quiet_period == []
    with pytest.raises(ValueError, match="AE title"):
        Settings(release_ends_quiet_period="A" * 17)  # type: ignore[arg-type]
