"""Child processes started and stopped by their PID: terminate, wait, kill.

Flower's SuperLink and SuperNode start helpers of their own
(``flower-superexec``, which starts ``flwr-serverapp``/``flwr-clientapp``), in
sessions of their own, that exit by themselves some seconds after their parent
(``--parent-pid``). :meth:`Child.stop` records the descendants of the process it
stops first, then stops each one that outlives it, by PID, and checks the
PID still names the same process (its start time in ``/proc``) before
signalling it, so a reused PID is never hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    found, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        start = _start_time(child)
        if start is not None:
            found.append((child, start))
            todo += _children(child)
    return found


def _signal_if_same(pid: int, start: int, sig: int) -> bool:
    if _start_time(pid) != start:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(procs: Sequence[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [(p, s) for p, s in alive if _start_time(p) == s]
    return alive


def stop_all(procs: Sequence[tuple[int, int]], grace: float = 10.0) -> None:
    """SIGTERM each (pid, start time) that still names the same process, wait ``grace`` s, SIGKILL the rest."""
    for pid, start in procs:
        _signal_if_same(pid, start, signal.SIGTERM)
    for pid, start in _wait_gone(procs, grace):
        _signal_if_same(pid, start, signal.SIGKILL)


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """Stop a process we did not start as a :class:`Child` (Flower's detached local SuperLink) and its descendants, by PID."""
    start = _start_time(pid)
    if start is not None:
        stop_all([(pid, start), *descendants(pid)], grace)


@dataclass
class Child:
    """One process we started, with its log."""

    name: str
    popen: subprocess.Popen
    log: Path | None = None
    _log_file: IO | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float, interval: float = 0.2) -> bool:
        """Wait until ``needle`` appears in the log (True), the process exits, or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output():
                return True
            if not self.alive():
                return needle in self.output()
            time.sleep(interval)
        return False

    def stop(self, grace: float = 10.0, helpers_grace: float = 2.0) -> int | None:
        """SIGTERM, wait ``grace`` s, SIGKILL; then the same for each descendant that outlived it. Returns the exit code."""
        family = descendants(self.pid)
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(grace)
        # Flower's helpers leave on their own some seconds after their parent; end those still there.
        stop_all(_wait_gone(family, helpers_grace), grace)
        if self._log_file is not None:
            self._log_file.close()
        return self.popen.returncode


def start(name: str, cmd: Sequence[str], env: Mapping[str, str], log: Path | None = None, cwd: Path | None = None,
          new_session: bool = False) -> Child:
    """Start ``cmd``; its stdout and stderr go to ``log`` (or are inherited when None)."""
    log_file = open(log, "ab") if log is not None else None  # noqa: SIM115 (closed by Child.stop)
    popen = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                             stdin=subprocess.DEVNULL, start_new_session=new_session)
    return Child(name, popen, Path(log) if log is not None else None, log_file)


def forward_signals(child: Child) -> None:
    """Pass SIGTERM and SIGINT on to ``child`` (a container's PID 1 gets them; the Flower process must too)."""

    def handler(signum, _frame):
        if child.alive():
            child.popen.send_signal(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
