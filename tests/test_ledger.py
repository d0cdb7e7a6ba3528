"""The event ledger: events.jsonl and the state it implies."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from machinable.ledger import STATES, Ledger
from machinable.storage import Claim

EVENTS = ["created", "dispatched", "submitted", "started", "finished", "failed", "interrupted", "cancelled", "heartbeat", "note"]
STATE_OF = {
    "created": "created", "dispatched": "dispatched", "submitted": "dispatched", "started": "running",
    "finished": "finished", "failed": "failed", "interrupted": "interrupted", "cancelled": "interrupted",
}


def expected_state(events: list[str], claim_held: bool) -> str:
    """The documented rules, written out independently of the implementation."""
    if "finished" in events:
        return "finished"  # final: nothing after it reopens the record
    known = [e for e in events if e in STATE_OF]
    if not known:
        return "created"
    state = STATE_OF[known[-1]]
    if state == "running" and not claim_held:
        return "interrupted"  # the process running it is gone
    return state


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(EVENTS), max_size=12), st.booleans())
def test_state_is_a_function_of_the_events(tmp_path_factory, events, claim_held):
    directory = tmp_path_factory.mktemp("ledger")
    ledger = Ledger(directory)
    for event in events:
        ledger.append(event, sync=False)
    claim = Claim(directory)
    if claim_held:
        assert claim.try_acquire()
    try:
        state = ledger.state()
        assert state == expected_state(events, claim_held)
        assert state in STATES
        assert ledger.state(check_claim=False) == expected_state(events, True)
        assert ledger.attempts() == events.count("started")
    finally:
        claim.release()


def test_events_are_json_lines_with_format_time_pid_host(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append("created")
    ledger.append("started", attempt=1)
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["event"] for r in rows] == ["created", "started"]
    for row in rows:
        assert row["format"] == 1 and row["time"].endswith("+00:00") and row["pid"] > 0 and row["host"]
    assert rows[1]["attempt"] == 1
    assert ledger.events() == rows


def test_an_attempt_is_open_until_it_ends(tmp_path):
    ledger = Ledger(tmp_path)
    assert not ledger.attempt_is_open()
    ledger.append("started", attempt=1)
    assert ledger.attempt_is_open()
    ledger.append("dispatched")
    assert ledger.attempt_is_open()  # a new dispatch does not end the dead attempt
    ledger.append("interrupted")
    assert not ledger.attempt_is_open()
    ledger.append("started", attempt=2)
    ledger.append("failed")
    assert not ledger.attempt_is_open()


def test_a_torn_last_event_is_ignored_and_repaired(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append("created")
    ledger.append("started", attempt=1)
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"format": 1, "event": "fini')  # killed mid-append
    assert [e["event"] for e in ledger.events()] == ["created", "started"]
    assert ledger.state() == "interrupted"
    assert ledger.repair()
    ledger.append("interrupted")
    assert [e["event"] for e in ledger.events()] == ["created", "started", "interrupted"]
    assert (tmp_path / "events.jsonl").read_bytes().endswith(b"\n")


def test_times_of_the_first_start_and_the_end(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append("created")
    assert ledger.first_time("started") is None and ledger.end_time() is None
    started = ledger.append("started", attempt=1)
    ledger.append("failed")
    ledger.append("started", attempt=2)
    finished = ledger.append("finished")
    assert ledger.first_time("started") == started["time"]
    assert ledger.end_time() == finished["time"]


def _started(attempt, files):
    return {"event": "started", "attempt": attempt, "git": {"commit": "c", "dirty": False, "json": files[0], "diff": files[1]}}


ATTEMPT_2 = ("attempts/2/git.json", "attempts/2/git.diff")


def test_git_files_are_those_the_finishing_attempt_names(tmp_path):
    ledger = Ledger(tmp_path)
    creation = ("git.json", "git.diff")
    assert ledger.git_files([]) == creation
    assert ledger.git_files([{"event": "started", "attempt": 1}]) == creation  # a record without per-attempt states
    two = [_started(1, creation), {"event": "failed", "attempt": 1}, _started(2, ATTEMPT_2)]
    assert ledger.git_files(two) == ATTEMPT_2  # unfinished: the last attempt
    assert ledger.git_files([*two, {"event": "finished", "attempt": 2}]) == ATTEMPT_2
    # a finished attempt 1 whose late events follow it (another launch's started, say): still attempt 1's
    assert ledger.git_files([_started(1, creation), {"event": "finished", "attempt": 1}, _started(2, ATTEMPT_2)]) == creation


def test_git_files_never_lead_outside_the_attempt_folders(tmp_path):
    ledger = Ledger(tmp_path)
    for files in [("../../other/git.json", "../../other/git.diff"), ("/etc/passwd", "/etc/passwd"),
                  ("attempts/3/git.json", "attempts/3/git.diff"), ("attempts/2/git.json", "experiment.json")]:
        assert ledger.git_files([_started(2, files), {"event": "finished", "attempt": 2}]) == ("git.json", "git.diff")


def test_the_index_reads_a_ledger_with_non_finite_numbers_as_the_ledger_does(tmp_path):
    from machinable.index import read_row

    directory = tmp_path / ("a" * 32)
    directory.mkdir()
    ledger = Ledger(directory)
    ledger.append("created")
    ledger.append("started", attempt=1, execution={"module": "machinable.execution.local", "config": {"scale": float("nan")}})
    ledger.append("finished", attempt=1, loss=float("inf"))  # written with NaN/Infinity tokens, not strict JSON
    assert ledger.state() == "finished"
    row = read_row(tmp_path, directory.name)
    assert (row["state"], row["execution"]) == ("damaged", "machinable.execution.local")  # no experiment.json here
    assert row["finished"] is not None and row["started"] is not None
