"""The event ledger (``events.jsonl``) of one experiment and the state it implies.

Events are appended one JSON line per write; a crash can at worst leave an
unterminated last line, which readers ignore and the next writer cuts off.
The state of an experiment is a pure function of its events (plus, for a
started run, whether its claim is still held).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from machinable.storage import ATTEMPTS, FORMAT, append_line, claim_is_held, now_iso, read_lines, repair_torn_tail

EVENTS = "events.jsonl"

# event -> the state it leaves the experiment in
_STATE_OF = {
    "created": "created",
    "dispatched": "dispatched",
    "submitted": "dispatched",
    "started": "running",
    "finished": "finished",
    "failed": "failed",
    "interrupted": "interrupted",
    "cancelled": "interrupted",
}
TERMINAL = {"finished", "failed", "interrupted"}
CREATION_GIT = ("git.json", "git.diff")
STATES = ("created", "dispatched", "running", "finished", "failed", "interrupted")


class Ledger:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / EVENTS

    def events(self) -> list[dict[str, Any]]:
        return read_lines(self.path)

    def append(self, event: str, *, sync: bool = True, **fields: Any) -> dict[str, Any]:
        row = {"format": FORMAT, "event": event, "time": now_iso(), "pid": os.getpid(), "host": socket.gethostname(), **fields}
        append_line(self.path, row, sync=sync)
        return row

    def repair(self) -> bool:
        return repair_torn_tail(self.path)

    def last(self, events: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        for row in reversed(events if events is not None else self.events()):
            if row.get("event") in _STATE_OF:
                return row
        return None

    def state(self, events: list[dict[str, Any]] | None = None, *, check_claim: bool = True) -> str:
        events = events if events is not None else self.events()
        if any(row.get("event") == "finished" for row in events):
            return "finished"  # final: no later event can reopen a finished record
        last = self.last(events)
        if last is None:
            return "created"
        state = _STATE_OF[last["event"]]
        if state == "running" and check_claim and not claim_is_held(self.directory):
            return "interrupted"
        return state

    def attempt_is_open(self, events: list[dict[str, Any]] | None = None) -> bool:
        """True if the last attempt started and never ended (its process died or froze)."""
        is_open = False
        for row in events if events is not None else self.events():
            event = row.get("event")
            if event == "started":
                is_open = True
            elif event in ("finished", "failed", "interrupted", "cancelled"):
                is_open = False
        return is_open

    def attempts(self, events: list[dict[str, Any]] | None = None) -> int:
        return sum(1 for row in (events if events is not None else self.events()) if row.get("event") == "started")

    def git_files(self, events: list[dict[str, Any]] | None = None) -> tuple[str, str]:
        """git.json and git.diff of the state the experiment ran with, relative to its folder.

        The ``started`` event of the attempt that finished (else of the last one)
        names them: ``attempts/<n>/...`` for an attempt that ran with another git
        state than at creation, else (and for records without per-attempt
        states) git.json and git.diff themselves.
        """
        events = events if events is not None else self.events()
        started = [row for row in events if row.get("event") == "started"]
        finished = next((row for row in reversed(events) if row.get("event") == "finished"), None)
        chosen = started[-1] if started else None
        if finished is not None:
            chosen = next((row for row in reversed(started) if row.get("attempt") == finished.get("attempt")), chosen)
        git = chosen.get("git") if chosen is not None else None
        if isinstance(git, dict):
            files = (git.get("json"), git.get("diff"))
            if files in _git_file_pairs(chosen.get("attempt")):  # never a path a damaged ledger made up
                return files  # type: ignore[return-value]
        return CREATION_GIT

    def first_time(self, event: str) -> str | None:
        for row in self.events():
            if row.get("event") == event:
                return row.get("time")
        return None

    def end_time(self) -> str | None:
        last = self.last()
        if last is not None and last["event"] in ("finished", "failed"):
            return last.get("time")
        return None


def _git_file_pairs(attempt: Any) -> list[tuple[str, str]]:
    pairs = [CREATION_GIT]
    if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt > 0:
        pairs.append((f"{ATTEMPTS}/{attempt}/git.json", f"{ATTEMPTS}/{attempt}/git.diff"))
    return pairs
