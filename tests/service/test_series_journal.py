"""The series journal: a listener that stops at any moment loses no series it acknowledged.

Each test runs a tracker with a journal, drops it as a killed process would (nothing flushed,
no shutdown), and starts a new tracker on the same spool, as the restarted listener does.
``tests/service/test_listener_main.py`` and ``tests/test_listener_restart.py`` do the same
with the real processes killed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtcontour.service.journal import SeriesJournal
from rtcontour.service.spool import InstanceHeader, InstanceSpool, SeriesTracker
from tests.service.conftest import FakeClock, RecordingSink, instance_header

SERIES_A = "1.2.3.4.100"
SERIES_B = "1.2.3.4.200"
QUIET_S = 5.0


def header(series_uid: str, sop: int) -> InstanceHeader:
    return instance_header(series_uid, sop, "Head 2.5mm")


_RUNNING: dict[Path, Node] = {}


class Node:
    """One run of the listener's spool, journal and tracker on ``spool_dir``; a new one on
    the same folder is the restart of a killed run (whose spool lock died with it)."""

    def __init__(self, spool_dir: Path, sink: RecordingSink | None = None) -> None:
        killed = _RUNNING.pop(spool_dir, None)
        if killed is not None:
            killed.journal.close()  # what the kernel does for a killed process
        _RUNNING[spool_dir] = self
        self.clock = FakeClock()
        self.sink = sink or RecordingSink()
        self.spool = InstanceSpool(spool_dir, min_free_disk_bytes=0)
        self.journal = SeriesJournal(spool_dir)
        self.tracker = SeriesTracker(
            self.sink, self.spool, quiet_period_s=QUIET_S, clock=self.clock,
            journal=self.journal,
        )

    def store(self, association: int, series_uid: str, sops: range) -> None:
        for sop in sops:
            item = header(series_uid, sop)
            self.spool.write(series_uid, item.sop_instance_uid, [b"DICM" * 8])
            self.tracker.instance_stored(association, item, "TPS", "RTCONTOUR")

    def after_quiet_period(self) -> list:  # type: ignore[type-arg]
        self.clock.advance(QUIET_S + 0.1)
        return self.tracker.poll()


def _move_first_instance(arrival, job: Path) -> None:  # type: ignore[no-untyped-def]
    """What an intake does first: one instance of the arrival moves into its job's folder."""
    job.mkdir(parents=True)
    first = sorted(arrival.folder.glob("*.dcm"))[0]
    os.replace(first, job / first.name)


def journal_files(spool_dir: Path) -> list[str]:
    return sorted(  # the lock file aside
        str(p.relative_to(spool_dir / "journal")) for p in (spool_dir / "journal").rglob("*")
        if p.name != ".lock"
    )


def test_released_series_killed_in_its_quiet_period_becomes_one_arrival_after_restart(
    tmp_path: Path,
) -> None:
    before = Node(tmp_path)
    before.store(1, SERIES_A, range(3))
    before.tracker.association_released(1)
    before.clock.advance(1.0)  # killed here: inside the quiet period, nothing emitted
    assert before.tracker.poll() == []

    after = Node(tmp_path)
    assert after.tracker.recover() == 1
    after.clock.advance(QUIET_S - 0.5)
    assert after.tracker.poll() == []  # the quiet period starts again at the restart
    [arrival] = after.after_quiet_period()
    assert arrival.series_instance_uid == SERIES_A and arrival.n_instances == 3
    assert (arrival.calling_ae, arrival.called_ae) == ("TPS", "RTCONTOUR")
    assert (arrival.study_instance_uid, arrival.modality) == ("1.2.3.4", "CT")
    assert arrival.series_description == "Head 2.5mm"
    assert journal_files(tmp_path) == []  # taken by the intake: nothing to recover again
    assert Node(tmp_path).tracker.recover() == 0


def test_series_of_an_association_open_when_killed_stays_interrupted_until_resent(
    tmp_path: Path,
) -> None:
    before = Node(tmp_path)
    before.store(1, SERIES_A, range(2))  # killed before the association was released

    after = Node(tmp_path)
    assert after.tracker.recover() == 0
    assert after.after_quiet_period() == [] and after.tracker.pending_series == 0
    assert journal_files(tmp_path) == []
    assert len(list((tmp_path / "incoming" / SERIES_A).glob("*.dcm"))) == 2  # kept, not a job

    after.store(7, SERIES_A, range(4))  # the TPS sends the series again
    after.tracker.association_released(7)
    [arrival] = after.after_quiet_period()
    assert arrival.n_instances == 4


def test_only_series_whose_associations_all_released_are_recovered(tmp_path: Path) -> None:
    before = Node(tmp_path)
    before.store(1, SERIES_A, range(2))
    before.store(2, SERIES_B, range(2))
    before.store(3, SERIES_B, range(2, 4))
    before.tracker.association_released(1)
    before.tracker.association_released(2)  # association 3 still open when killed

    after = Node(tmp_path)
    assert after.tracker.recover() == 1
    assert [a.series_instance_uid for a in after.after_quiet_period()] == [SERIES_A]


def test_abort_followed_by_a_released_resend_is_recovered(tmp_path: Path) -> None:
    before = Node(tmp_path)
    before.store(1, SERIES_A, range(2))
    before.tracker.association_aborted(1)
    before.store(2, SERIES_A, range(3))  # the TPS sends again: the later sender decides
    before.tracker.association_released(2)

    after = Node(tmp_path)
    assert after.tracker.recover() == 1
    [arrival] = after.after_quiet_period()
    assert arrival.n_instances == 3


def test_aborted_series_dropped_in_memory_is_dropped_from_the_journal(tmp_path: Path) -> None:
    before = Node(tmp_path)
    before.store(1, SERIES_A, range(2))
    before.tracker.association_aborted(1)
    assert before.after_quiet_period() == []
    assert journal_files(tmp_path) == []


def test_killed_while_the_intake_moved_part_of_the_series_the_rest_arrives_after_restart(
    tmp_path: Path,
) -> None:
    class DyingIntake(RecordingSink):
        """Moves the first instance into the job folder, then the process dies."""

        def series_complete(self, arrival):  # type: ignore[no-untyped-def]
            _move_first_instance(arrival, tmp_path / "jobs" / "job-1")
            raise SystemExit("killed")  # not an Exception: the tracker cannot handle it

    before = Node(tmp_path, DyingIntake())
    before.store(1, SERIES_A, range(3))
    before.tracker.association_released(1)
    with pytest.raises(SystemExit):
        before.after_quiet_period()

    after = Node(tmp_path)
    assert after.tracker.recover() == 1
    [arrival] = after.after_quiet_period()
    assert arrival.n_instances == 2  # the intake merges them into the job it had created


def test_batch_handed_to_the_intake_survives_a_resend_the_crash_cut_short(
    tmp_path: Path,
) -> None:
    """While the intake takes the released batch, the TPS starts sending the series again on
    another association; the crash cuts that one: the acknowledged batch is not dropped."""
    node: Node

    class IntakeDyingDuringAResend(RecordingSink):
        def series_complete(self, arrival):  # type: ignore[no-untyped-def]
            _move_first_instance(arrival, tmp_path / "jobs" / "job-1")
            node.store(2, SERIES_A, range(3, 4))  # another association, never released
            raise SystemExit("killed")

    node = Node(tmp_path, IntakeDyingDuringAResend())
    node.store(1, SERIES_A, range(3))
    node.tracker.association_released(1)
    with pytest.raises(SystemExit):
        node.after_quiet_period()

    after = Node(tmp_path)
    assert after.tracker.recover() == 1
    [arrival] = after.after_quiet_period()
    assert arrival.n_instances == 3  # two of the batch, and the one the cut resend brought
    assert journal_files(tmp_path) == []


def test_series_the_intake_had_wholly_taken_is_forgotten_at_restart(tmp_path: Path) -> None:
    before = Node(tmp_path)
    before.store(1, SERIES_A, range(2))
    before.tracker.association_released(1)
    for path in (tmp_path / "incoming" / SERIES_A).glob("*.dcm"):
        path.unlink()  # moved to its job folder; killed before the journal was updated

    after = Node(tmp_path)
    assert after.tracker.recover() == 0
    assert journal_files(tmp_path) == []


def test_sink_failure_keeps_the_journal_until_the_series_is_taken(tmp_path: Path) -> None:
    class DownOnce(RecordingSink):
        down = True

        def series_complete(self, arrival):  # type: ignore[no-untyped-def]
            if self.down:
                self.down = False
                raise RuntimeError("database down")
            super().series_complete(arrival)

    node = Node(tmp_path, DownOnce())
    node.store(1, SERIES_A, range(2))
    node.tracker.association_released(1)
    assert node.after_quiet_period() == []
    assert journal_files(tmp_path) == [SERIES_A, f"{SERIES_A}/{node.journal.carrier(1)}.taking"]
    assert len(node.after_quiet_period()) == 1
    assert journal_files(tmp_path) == []


def test_journal_failure_refuses_the_instance_and_tracks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path)

    def disk_error(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(node.journal, "opened", disk_error)
    with pytest.raises(OSError):
        node.store(1, SERIES_A, range(1))
    node.tracker.association_released(1)
    assert node.after_quiet_period() == [] and node.tracker.pending_series == 0


def test_journal_markers_hold_uids_and_ae_titles_only(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.store(1, SERIES_A, range(1))
    [marker] = (tmp_path / "journal" / SERIES_A).iterdir()
    assert marker.name == f"{node.journal.carrier(1)}.open"
    assert sorted(json.loads(marker.read_text())) == [
        "called_ae", "calling_ae", "modality", "series_description", "series_instance_uid",
        "study_instance_uid",
    ]
    assert list((tmp_path / "incoming" / SERIES_A).iterdir())[0].suffix == ".dcm"


def test_instance_and_marker_are_synced_to_disk_before_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    node.store(1, SERIES_A, range(1))
    series_folder = str(tmp_path / "incoming" / SERIES_A)
    journal_folder = str(tmp_path / "journal" / SERIES_A)
    assert any(path.startswith(series_folder + "/.") for path in synced)  # the file's data
    assert series_folder in synced and journal_folder in synced  # and the names in folders


# -- a restart between associations is invisible --------------------------------------------
SESSION = st.tuples(
    st.lists(st.sampled_from([SERIES_A, SERIES_B]), min_size=1, max_size=2, unique=True),
    st.integers(min_value=1, max_value=3),  # instances of each series it sends
    st.booleans(),  # released (else aborted)
    st.sampled_from([0.5, QUIET_S + 0.1]),  # then nothing for this long
    st.booleans(),  # then the listener is killed and started again
)


def _run_sessions(spool_dir: Path, sessions: list, *, crash: bool) -> list:  # type: ignore[type-arg]
    """Play ``sessions`` one association after another; where a session says so, either kill
    and restart the listener (``crash``) or let the same time pass; return what the intake
    took: (poll, series, sorted SOP file names) per arrival, sorted."""
    taken: list[tuple[int, str, list[str]]] = []
    polls = [0]

    class MovingIntake(RecordingSink):
        def series_complete(self, arrival):  # type: ignore[no-untyped-def]
            job = spool_dir / "jobs" / str(len(taken))
            job.mkdir(parents=True)
            names = sorted(p.name for p in arrival.folder.glob("*.dcm"))
            for name in names:
                os.replace(arrival.folder / name, job / name)
            taken.append((polls[0], arrival.series_instance_uid, names))

    sink = MovingIntake()
    node = Node(spool_dir, sink)
    sop = 0
    for serial, (series_uids, n, released, wait_s, restart) in enumerate(sessions, start=1):
        for uid in series_uids:
            node.store(serial, uid, range(sop, sop + n))
            sop += n
        if released:
            node.tracker.association_released(serial)
        else:
            node.tracker.association_aborted(serial)
        node.tracker.connection_closed(serial)
        node.clock.advance(wait_s)
        polls[0] += 1
        node.tracker.poll()
        if restart:
            if crash:
                node = Node(spool_dir, sink)
                node.tracker.recover()
            node.clock.advance(QUIET_S + 0.1)
            polls[0] += 1
            node.tracker.poll()
    polls[0] += 1
    node.clock.advance(QUIET_S + 0.1)
    node.tracker.poll()
    return sorted(taken)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sessions=st.lists(SESSION, min_size=1, max_size=6))
def test_a_restart_between_associations_changes_nothing_the_intake_receives(
    tmp_path_factory: pytest.TempPathFactory, sessions: list  # type: ignore[type-arg]
) -> None:
    """Whatever was released, aborted and re-sent before it, a listener killed and started
    again between two associations hands the intake the same series with the same instances
    as one that ran on; and leaves no journal behind."""
    without = _run_sessions(tmp_path_factory.mktemp("ran-on"), sessions, crash=False)
    spool_dir = tmp_path_factory.mktemp("restarted")
    with_restarts = _run_sessions(spool_dir, sessions, crash=True)
    assert with_restarts == without
    assert journal_files(spool_dir) == []


def test_a_second_listener_on_the_same_spool_is_refused_with_a_sentence(tmp_path: Path) -> None:
    from rtcontour.common.errors import ConfigurationError

    running = SeriesJournal(tmp_path)
    with pytest.raises(ConfigurationError, match="another rtcontour listener uses the spool"):
        SeriesJournal(tmp_path)
    running.close()
    SeriesJournal(tmp_path).close()  # once the first has stopped, the spool is free
