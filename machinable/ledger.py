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

from machinable.storage import FORMAT, append_line, claim_is_held, now_iso, read_lines, repair_torn_tail

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
