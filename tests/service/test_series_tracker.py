"""SeriesTracker: when a series becomes exactly one arrival (pure logic, a fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtcontour.service.spool import InstanceSpool, SeriesTracker
from tests.service.conftest import FakeClock, RecordingSink, instance_header

SERIES_A = "1.2.3.4.100"
SERIES_B = "1.2.3.4.200"
QUIET_S = 5.0
GRACE_S = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def tracker(tmp_path: Path, sink: RecordingSink, clock: FakeClock) -> SeriesTracker:
    spool = InstanceSpool(tmp_path, min_free_disk_bytes=0)
    return SeriesTracker(
        sink, spool, quiet_period_s=QUIET_S, outcome_grace_s=GRACE_S, clock=clock
    )


def store(tracker: SeriesTracker, association: int, series_uid: str, n: int = 3) -> None:
    for sop in range(n):
        tracker.instance_stored(association, instance_header(series_uid, sop), "TPS")


def test_released_series_is_emitted_once_after_the_quiet_period(tracker, sink, clock):
    store(tracker, 1, SERIES_A)
    tracker.association_released(1)
    tracker.connection_closed(1)
    clock.advance(QUIET_S - 0.1)
    assert tracker.poll() == []
    clock.advance(0.2)
    [arrival] = tracker.poll()
    assert arrival.series_instance_uid == SERIES_A and arrival.calling_ae == "TPS"
    clock.advance(100)
    assert tracker.poll() == [] and len(sink.arrivals) == 1
    assert tracker.tracked_associations == 0 and tracker.pending_series == 0


def test_connection_close_reported_before_release_still_completes_the_series(
    tracker, sink, clock
):
    store(tracker, 1, SERIES_A)
    tracker.connection_closed(1)  # pynetdicom may report the close before EVT_RELEASED
    clock.advance(QUIET_S + 1)
    assert tracker.poll() == []  # outcome not known yet: wait, do not guess
    tracker.association_released(1)
    assert [a.series_instance_uid for a in tracker.poll()] == [SERIES_A]


def test_series_waits_for_every_association_that_carried_it(tracker, clock):
    store(tracker, 1, SERIES_A)
    store(tracker, 2, SERIES_A)
    tracker.association_released(1)
    clock.advance(QUIET_S + 1)
    assert tracker.poll() == []
    tracker.association_released(2)
    assert len(tracker.poll()) == 1


def test_instance_within_quiet_period_restarts_it(tracker, clock):
    store(tracker, 1, SERIES_A)
    tracker.association_released(1)
    clock.advance(QUIET_S - 1)
    store(tracker, 2, SERIES_A, n=1)
    tracker.association_released(2)
    clock.advance(2)
    assert tracker.poll() == []
    clock.advance(QUIET_S)
    assert len(tracker.poll()) == 1


def test_aborted_association_produces_no_arrival(tracker, sink, clock):
    store(tracker, 1, SERIES_A)
    tracker.association_aborted(1)
    tracker.connection_closed(1)
    clock.advance(QUIET_S * 3)
    assert tracker.poll() == [] and sink.arrivals == []
    assert tracker.pending_series == 0 and tracker.tracked_associations == 0


def test_series_interrupted_then_completed_by_another_association_is_emitted(tracker, clock):
    store(tracker, 1, SERIES_A)
    tracker.association_aborted(1)
    store(tracker, 2, SERIES_A)
    tracker.association_released(2)
    clock.advance(QUIET_S + 1)
    assert [a.series_instance_uid for a in tracker.poll()] == [SERIES_A]


def test_connection_closed_without_outcome_counts_as_aborted_after_grace(tracker, sink, clock):
    store(tracker, 1, SERIES_A)
    tracker.connection_closed(1)
    clock.advance(GRACE_S + 1)
    assert tracker.poll() == [] and tracker.pending_series == 0


def test_two_series_in_one_association_become_two_arrivals(tracker, clock):
    store(tracker, 1, SERIES_A)
    store(tracker, 1, SERIES_B)
    tracker.association_released(1)
    clock.advance(QUIET_S + 1)
    assert sorted(a.series_instance_uid for a in tracker.poll()) == [SERIES_A, SERIES_B]


def test_serials_are_never_confused_between_associations(tracker, clock):
    store(tracker, 7, SERIES_A)
    tracker.association_released(8)  # another association (e.g. a C-ECHO) released
    clock.advance(QUIET_S + 1)
    assert tracker.poll() == []


def test_flush_emits_complete_series_without_waiting_for_the_quiet_period(tracker, clock):
    store(tracker, 1, SERIES_A)
    store(tracker, 2, SERIES_B)
    tracker.association_released(1)
    assert [a.series_instance_uid for a in tracker.stop(flush=True)] == [SERIES_A]


def test_sink_failure_is_retried_after_the_quiet_period(tmp_path, clock):
    class FlakySink(RecordingSink):
        failures = 1

        def series_complete(self, arrival):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("database down")
            super().series_complete(arrival)

    sink = FlakySink()
    tracker = SeriesTracker(
        sink, InstanceSpool(tmp_path, min_free_disk_bytes=0), quiet_period_s=QUIET_S, clock=clock
    )
    store(tracker, 1, SERIES_A)
    tracker.association_released(1)
    clock.advance(QUIET_S + 1)
    assert tracker.poll() == []
    clock.advance(QUIET_S + 1)
    assert len(tracker.poll()) == 1 and len(sink.arrivals) == 1
