"""Where a run's wall time goes: named phases, timed exclusively (a phase inside another pauses the
outer one), so that the breakdown a run prints at its end adds up to the whole process.

    with phases.timed("calibration"):
        ...
    log(phases.breakdown())

One recorder per process (like interrupts.py): the code that trains, calibrates, evaluates and
plots marks its phases without passing a recorder around. "start-up and imports" is the time from
the process's start (as the kernel recorded it) to the first phase.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

_seconds: dict[str, float] = defaultdict(float)
_stack: list[list] = []  # [name, started] of the phases open now, innermost last
_origin = time.perf_counter()  # when the breakdown starts: the process's start (`mdn`), or a run's start
_first: float | None = None  # when the first phase opened
_from_process = False
_run_begun = False


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc); 0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def reset(from_process_start: bool = False) -> None:
    """Start a new breakdown now, or (the `mdn` command, first thing) from the process's start."""
    global _origin, _first, _from_process, _run_begun
    _seconds.clear()
    _stack.clear()
    _origin, _first = time.perf_counter() - (_process_age() if from_process_start else 0.0), None
    _from_process, _run_begun = from_process_start, False


def begin_run() -> None:
    """A run starts: keep the breakdown that started with the process (the `mdn` command: its
    start-up and any planning belong to the run), else start a new one (a library call, or a
    second run in the same process)."""
    global _run_begun
    if not _from_process or _run_begun:
        reset()
    _run_begun = True


@contextmanager
def timed(name: str) -> Iterator[None]:
    global _first
    now = time.perf_counter()
    if _first is None:
        _first = now
    if _stack:
        outer = _stack[-1]
        _seconds[outer[0]] += now - outer[1]
    _stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        _seconds[name] += now - _stack.pop()[1]
        if _stack:
            _stack[-1][1] = now


def elapsed() -> float:
    """Seconds since the breakdown started."""
    return time.perf_counter() - _origin


def seconds() -> dict[str, float]:
    """Every phase's seconds, with "start-up and imports" (before the first phase) and "other"
    (between phases), which together add up to the time since the breakdown started."""
    now = time.perf_counter()
    out = {"start-up and imports": (_first if _first is not None else now) - _origin, **_seconds}
    if _stack:  # the innermost open phase counts to now (the outer ones were paused when it opened)
        name, started = _stack[-1]
        out[name] = out.get(name, 0.0) + now - started
    out["other"] = max(0.0, (now - _origin) - sum(out.values()))
    return out


def breakdown(title: str = "where the time went") -> str:
    """A few lines: each phase's wall time and share, largest first, and the total."""
    times = seconds()
    total = sum(times.values())
    width = max(len(name) for name in times)
    rows = [f"  {name.ljust(width)}  {s:8.1f} s  {s / total:6.1%}" for name, s in sorted(times.items(), key=lambda kv: -kv[1])
            if s >= 0.05]
    return "\n".join([f"{title} ({total:.1f} s in all):", *rows])
