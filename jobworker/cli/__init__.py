"""The ``jobworker`` command: the spec's CLI on the jobworker client module.

``main(argv)`` returns the exit status (the console script passes it to
sys.exit). Every failure is one line ``Error: <message>`` on stderr, never a
traceback: 1 for errors the server reported, 2 for usage errors, 3 when the
server cannot be reached (or stops answering), 4 when it is shutting down, 130 on
Ctrl+C.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Sequence

import trio

from jobworker.cli.args import (
    EXIT_CONNECT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_SHUTDOWN,
    EXIT_USAGE,
    UsageError,
    parse,
    print_usage_error,
)
from jobworker.cli.commands import run
from jobworker.cli.render import escape
from jobworker.errors import (
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    RpcError,
    ServerShuttingDown,
    leaves,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: sys.argv[1:]); return the exit status."""
    try:
        try:
            command = parse(sys.argv[1:] if argv is None else argv)
        except UsageError as error:
            print_usage_error(error)
            return EXIT_USAGE
        except SystemExit as done:  # --help, --version
            return done.code if isinstance(done.code, int) else EXIT_OK
        return trio.run(run, command, sys.stdout.buffer, sys.stderr)
    except BaseException as exc:  # the outermost layer: report, never a traceback
        return _report(exc)


def exit_status(error: RpcError) -> int:
    """The exit status for an error the client raised."""
    if isinstance(error, ServerShuttingDown):
        return EXIT_SHUTDOWN
    if isinstance(error, ConnectError | ConnectionLost | DeadlineExceeded):
        return EXIT_CONNECT
    return EXIT_SERVER_ERROR


def _report(exc: BaseException) -> int:
    found = leaves(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
        with contextlib.suppress(Exception):
            if sys.stderr.isatty():
                sys.stderr.write("\n")  # after the terminal's ^C
        return EXIT_INTERRUPTED
    if any(isinstance(leaf, BrokenPipeError) for leaf in found):
        # stdout was closed early ("| head"): not an error for the user.
        _silence_stdout()
        return EXIT_OK
    for leaf in found:
        if isinstance(leaf, SystemExit):
            return leaf.code if isinstance(leaf.code, int) else EXIT_OK
    error = next((leaf for leaf in found if isinstance(leaf, RpcError)), None)
    if error is not None:
        _error_line(str(error))
        return exit_status(error)
    first = found[0]
    _error_line(f"unexpected {type(first).__name__}: {first}")
    return EXIT_SERVER_ERROR


def _error_line(message: str) -> None:
    # The message may quote what a server or a job's creator sent: escaped, one line.
    with contextlib.suppress(Exception):
        print("Error: " + escape(message.strip()), file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
