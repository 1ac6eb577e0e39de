"""Ctrl-C and SIGTERM: a stop the user asks for is acted on at safe points, never inside library code.

While a command runs (`install`, from the `mdn` entry point and `stop_requests` in each long
command), SIGINT and SIGTERM only *record* that a stop was asked. The command's loops call
`check()` at safe points (between batches, between phases, after an epoch's files are written),
which raises `Interrupted` there: so no KeyboardInterrupt ever lands inside `torch.save`, a thread
lock, the DataLoader's fork handlers or an import. A second signal stops at once (`forced`),
except inside `interrupts_held` blocks (an epoch's group of files), which it waits for.

DataLoader workers ignore both signals (`ignore_in_worker`, their `worker_init_fn`): a Ctrl-C in
a terminal reaches the whole process group, and only the main process decides; it then stops its
workers itself (`dataset.close_loader`), so none is left printing a broken-pipe traceback.

`reached(name)` marks a named moment of a command. Tests set MDN_TEST_SIGNAL_AT=name[#n][,name[#n]...]
(MDN_TEST_SIGNAL=INT|TERM|KILL) to have the signal sent exactly there, on the n-th time the moment
is reached: a signal at a chosen moment, chosen by an event the process reports, never by a sleep.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The user asked the command to stop (Ctrl-C or SIGTERM); raised at a safe point, or at once
    for a second signal (`forced`)."""

    def __init__(self, signum: int, forced: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.forced = signum, forced

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum


_requested: int | None = None  # the first stop signal received, until the command ends
_installed = False
_hold_depth = 0  # open interrupts_held blocks
_forced_pending: int | None = None  # a second signal that arrived inside a held block
_collective = False  # under torchrun: processes stop together, at the points they reach together


def _on_signal(signum: int, frame) -> None:
    global _requested, _forced_pending
    if _requested is None:
        _requested = signum
        # os.write, not print: the main thread may be inside a write to sys.stderr (a progress bar),
        # and a buffered write re-entered from a handler raises.
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping at the next safe point "
                    "(press Ctrl-C again to stop at once)\n".encode())
        return
    if _hold_depth:
        _forced_pending = signum
        return
    raise Interrupted(signum, forced=True)


def install() -> None:
    """Record SIGINT and SIGTERM from now on (main thread only; idempotent)."""
    global _installed
    if threading.current_thread() is threading.main_thread() and not _installed:
        for s in SIGNALS:
            signal.signal(s, _on_signal)
        _installed = True


@contextmanager
def stop_requests() -> Iterator[None]:
    """Run a command with stop requests recorded, then put the previous handlers back. Nested or
    already installed (the `mdn` entry point installs them first thing): a no-op that keeps any
    stop already asked for."""
    global _installed, _requested, _forced_pending
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    install()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _installed, _requested, _forced_pending = False, None, None


def requested() -> int | None:
    """The signal of a stop asked for and not yet acted on (None: none)."""
    return _requested


def check() -> None:
    """A safe point: raise Interrupted if a stop was asked for. Inside `collective()` a no-op: one
    process of several stopping alone would leave the others waiting in a collective operation."""
    if _requested is not None and not _collective:
        raise Interrupted(_requested)


def stop_if(asked: bool) -> None:
    """A safe point every process reaches together: `asked` says whether a stop was asked for in
    any of them (they agree on it with one all-reduce); the ones never signalled stop as if by SIGTERM."""
    if asked:
        raise Interrupted(_requested or signal.SIGTERM)


@contextmanager
def collective(enabled: bool = True) -> Iterator[None]:
    """While the processes of a torchrun job train together: `check()` defers to `stop_if`."""
    global _collective
    before, _collective = _collective, enabled
    try:
        yield
    finally:
        _collective = before


@contextmanager
def interrupts_held() -> Iterator[None]:
    """A group of writes (an epoch's checkpoints and history) that a stop waits for. Under
    `stop_requests`, a first signal is only recorded anyway, and a second one waits for the block.
    Without it (mdn used as a library), SIGINT and SIGTERM are held here and delivered to the
    handlers in force before once the block ends. Nests; a no-op outside the main thread."""
    global _hold_depth, _forced_pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _installed or _hold_depth:
        _hold_depth += 1
        try:
            yield
        finally:
            _hold_depth -= 1
        if not _hold_depth and _forced_pending is not None:
            signum, _forced_pending = _forced_pending, None
            raise Interrupted(signum, forced=True)
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    _hold_depth += 1
    try:
        yield
    finally:
        _hold_depth -= 1
        for s, handler in previous.items():  # a signal arriving meanwhile still lands in `held`
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(held):  # each kind once; the handler in force before decides what it means
            signal.raise_signal(signum)


def ignore_in_worker(moment: str, worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn` (with `moment` bound): the main process alone decides
    when to stop. The first worker marks the moment the workers start."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    # A batch this worker cannot hand over (shared memory full) is dropped by Python's queue with a
    # printed traceback, and the main process would wait for it for ever: exit instead, which the
    # main process notices and reports (dataset.Loader).
    import multiprocessing.queues

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(lambda e, obj: os._exit(70))
    if worker_id == 0:
        reached(moment)


# --- test hook: a signal at a named moment ---------------------------------------------------------

_PLAN: tuple[int, dict[str, list[int]]] = (-1, {})  # (pid, moment -> the counts at which to signal)
_SEEN: dict[str, int] = {}


def _plan() -> dict[str, list[int]]:
    """MDN_TEST_SIGNAL_AT, read once per process (a forked process reads its own)."""
    global _PLAN, _SEEN
    if _PLAN[0] != os.getpid():
        plan: dict[str, list[int]] = {}
        for item in filter(None, os.environ.get("MDN_TEST_SIGNAL_AT", "").split(",")):
            name, _, count = item.strip().partition("#")
            plan.setdefault(name, []).append(int(count or 1))
        _PLAN, _SEEN = (os.getpid(), plan), {}
    return _PLAN[1]


def reached(name: str) -> None:
    """A named moment (`start`, `model-built`, `train-batch`, `checkpoint-write`, ...). Costs a dict
    lookup; only tests (MDN_TEST_SIGNAL_AT) make it do anything."""
    plan = _plan()
    if name not in plan:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    signum = signal.Signals["SIG" + os.environ.get("MDN_TEST_SIGNAL", "INT").upper().removeprefix("SIG")]
    # from a DataLoader worker (which ignores signals), the stop goes where a user's would: the main process
    data = sys.modules.get("torch.utils.data")
    in_worker = data is not None and data.get_worker_info() is not None
    for _ in range(plan[name].count(_SEEN[name])):  # `name#1,name#1`: two signals at once
        os.kill(os.getppid() if in_worker else os.getpid(), signum)
