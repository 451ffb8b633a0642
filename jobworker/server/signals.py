"""The signals the server handles, and what each does.

- SIGINT, SIGTERM: graceful shutdown (every job stopped and recorded). Another one while
  shutting down is logged and changes nothing: a shutdown never abandons a job, and its
  length is bounded by the drain and the stop grace already (SIGKILL is the way out).
- SIGHUP: reload (the server's certificate and CA, for new connections).
- SIGUSR1: one debug line with task and connection counts.

Once the server's receiver is closed (start-up failed, or shutdown finished) these signals are
noted and ignored until the process exits, so a late SIGTERM cannot turn a clean exit (0)
into death by signal (143).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType

import trio

log = logging.getLogger("jobworker.server")

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP
DEBUG_SIGNAL = signal.SIGUSR1  # logs task and connection counts (used by the tests)
HANDLED_SIGNALS = (*SHUTDOWN_SIGNALS, RELOAD_SIGNAL, DEBUG_SIGNAL)


def _late(signum: int, _frame: FrameType | None) -> None:
    """A signal outside the server's receiver: the server is not serving, nothing to do."""


@contextlib.contextmanager
def open_server_signals() -> Iterator[AsyncIterator[int]]:
    """trio's signal receiver for HANDLED_SIGNALS. Underneath it ``_late`` is installed, which
    trio restores on exit, and then SIG_IGN: a signal after the receiver closed is ignored
    instead of killing a process that is exiting cleanly."""
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _late)
    try:
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            yield signals
    finally:
        # Python handlers are reset to the default when the interpreter finalizes; the
        # process is only exiting now, so the kernel may drop these signals from here on.
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


async def watch_signals(
    signals: AsyncIterator[int],
    shutdown: trio.Event,
    *,
    reload: Callable[[], None],
    debug: Callable[[], str],
    on_shutdown: Callable[[], None] = lambda: None,
) -> None:
    """Act on each signal from ``signals`` (see the module docstring); runs until cancelled.

    ``on_shutdown`` runs right after ``shutdown`` is set by the first shutdown signal (the
    server uses it to cut a start-up short: a long load of records is cancelled at once)."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == DEBUG_SIGNAL:
            log.info("debug: %s", debug())
        elif signum == RELOAD_SIGNAL:
            log.info("%s received: reloading", name)
            reload()
        elif not shutdown.is_set():
            log.info("%s received: shutting down", name)
            shutdown.set()
            on_shutdown()
        else:
            log.warning(
                "%s received again: already shutting down, every job is being stopped", name
            )
