"""The command line of ``jobworker``: parsing, defaults, environment.

Pure: no I/O but argparse's own help/usage printing, no server. ``parse(argv,
environ)`` returns a ``Command`` or raises ``UsageError`` / ``SystemExit(0)``
(for --help and --version).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from jobworker import __version__
from jobworker.cli.render import escape
from jobworker.client.address import parse_server
from jobworker.engine.idempotency import MAX_REQUEST_ID_CHARS, REQUEST_ID_TTL_S
from jobworker.engine.model import JobStatus
from jobworker.engine.spec import JOB_PATH, MAX_ARG_STRLEN
from jobworker.wire.contract import DEFAULT_PORT

DEFAULT_SERVER = f"localhost:{DEFAULT_PORT}"  # the spec's default
DEFAULT_CERTS_DIR = "certs"  # the spec's certs/client-cert.pem etc., relative to the cwd
CERT_FILE, KEY_FILE, CA_FILE = "client-cert.pem", "client-key.pem", "ca-cert.pem"
ENV_SERVER = "JOB_WORKER_SERVER"
ENV_CERT_PATH = "JOB_WORKER_CERT_PATH"  # a directory holding the three files above
DEFAULT_TIMEOUT_S = 5.0  # connection setup and each unary call
INT32_MAX = 2**31 - 1  # the API's limits are int32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # GetJobsStreamReq.offset is int64
OUTPUT_FORMATS = ("text", "json")

EXIT_OK = 0
EXIT_SERVER_ERROR = 1  # the server answered with an error (or a streamed job did not complete)
EXIT_USAGE = 2
EXIT_CONNECT = 3  # the server could not be reached, refused TLS, went away or did not answer
EXIT_SHUTDOWN = 4  # the server is shutting down (gracefully): try again once it is back
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

TRUE_WORDS = frozenset({"1", "t", "true", "yes", "y", "on"})  # Go's ParseBool, plus yes/no
FALSE_WORDS = frozenset({"0", "f", "false", "no", "n", "off"})


class UsageError(Exception):
    """The command line is wrong. str() is the one-line message; ``command`` the subcommand."""

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command


@dataclass(frozen=True)
class Connection:
    """Where and how to connect, after flags > environment > defaults."""

    server: str
    cert: str
    key: str
    ca: str
    timeout: float


@dataclass(frozen=True)
class Command:
    """A parsed command line."""

    name: str  # create, get, list, stop, delete, stream
    connection: Connection
    output: str = "text"
    job_id: str = ""
    command: str = ""
    args: tuple[str, ...] = ()
    max_cpu: int = 0
    max_memory: int = 0
    max_iobps: int = 0
    timeout_seconds: int = 0  # create: the job's time limit (0: the server's default)
    env: tuple[tuple[str, str], ...] = ()  # create: variables added to the job's environment
    working_dir: str = ""  # create: the job's cwd on the server's host ("": its scratch dir)
    request_id: str = ""  # create: its idempotency key ("": a fresh one per invocation)
    follow: bool = True
    offset: int = 0  # stream: the byte to start at (negative: from the end)
    tail: int | None = None  # stream: start at the last N lines instead
    retry: bool = True  # stream: reconnect and resume when the connection drops
    statuses: tuple[str, ...] = ()  # list: only jobs in one of these statuses (): all)
    owner: str = ""  # list: only jobs created by this certificate CN ("": anyone's)
    limit: int | None = None  # list: stop after this many jobs
    newest_first: bool = False  # list: highest id first


EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_SERVER_ERROR}    the server reported an error (e.g. job not found, permission denied);
       for stream: the job ended other than COMPLETED
  {EXIT_USAGE}    usage error
  {EXIT_CONNECT}    cannot connect: server unreachable, TLS failure, certificate refused,
       missing or unusable, connection lost, or no answer within --timeout
  {EXIT_SHUTDOWN}    the server is shutting down ("Error: server shutting down"): the call
       or stream was cut short; try again once it is back
  {EXIT_INTERRUPTED}  interrupted (Ctrl+C)
  When stdout is closed early (e.g. "| head"), jobworker stops quietly with status 0."""

MAIN_EPILOG = f"""\
--server, --cert, --key, --ca, --timeout and -o may also follow the command
(jobworker list --server=HOST:PORT); for create, only before the job's command:
everything after it is the job's. After "create", --timeout is the job's time
limit: give the call's timeout before "create".

environment:
  {ENV_SERVER}     server address (overridden by --server)
  {ENV_CERT_PATH}  directory holding {CERT_FILE}, {KEY_FILE}, {CA_FILE}
                        (overridden by --cert/--key/--ca)

examples:
  jobworker create echo "hello world"
  jobworker --server=prod.example.com:50051 \\
    --cert=certs/admin-client-cert.pem \\
    --key=certs/admin-client-key.pem \\
    create echo "remote job"
  export {ENV_SERVER}="prod.example.com:50051"
  export {ENV_CERT_PATH}="./certs"
  jobworker create echo "hello"

{EXIT_CODES_HELP}
"""

COMMAND_HELP: dict[str, tuple[str, str]] = {
    "create": (
        "Create and start a new job.",
        f"""\
Everything after <command> belongs to the job, options included.
Use "--" before a command that starts with "-".

A <command> without a slash is looked up in the job's PATH, not the server's
(nor yours):
  PATH={JOB_PATH}
A <command> with a slash must be an absolute path: a job runs in a fresh work
dir of its own, so "./x" is refused. Each argument may be at most
{MAX_ARG_STRLEN - 1} bytes (the kernel's MAX_ARG_STRLEN), and all of them together must fit in the
kernel's ARG_MAX for one exec.

--timeout (or --time-limit) stops the job after that long (SIGTERM, then SIGKILL)
and records it FAILED, "timed out after N s" (0: the server's default,
--default-job-timeout); the call's own timeout goes before "create".
--env NAME=VALUE (repeatable) adds
a variable to the job's environment (PATH too: the command is then looked up
in it). --workdir DIR runs the job in DIR, an absolute path on the server's
host (default: a scratch dir of its own, also its HOME).

Every create carries a request id, a fresh random one unless --request-id
gives it. A create that got no answer (the connection lost mid-call, or no
answer within --timeout) is sent once more, on a new connection, with the same
id: if the first one reached the server, the answer is the job it started,
never a second one. Giving the id yourself makes a create safe to
repeat (a script's retry): within {REQUEST_ID_TTL_S // 3600} h, the same id from the same
certificate returns the same job.

examples:
  jobworker create echo "hello world"
  jobworker create --timeout 30s --env NAME=x --workdir /srv sh -c 'echo $NAME; pwd'
  jobworker create --max-cpu=50 python3 script.py
  jobworker create --max-cpu=50 --max-memory=512 python3 script.py
  jobworker create bash -c "sleep 10 && echo done"
  jobworker create python3 -u script.py -v
  jobworker create --request-id nightly-backup-2024-01-15 /usr/local/bin/backup
""",
    ),
    "get": ("Get detailed information about a job.", "example:\n  jobworker get 1\n"),
    "list": (
        "List all jobs.",
        """\
One line per job, as the spec prints them, in id order (oldest first), paged
from the server (ListJobs; a server without it is asked for every job at once).
--status keeps only jobs in that status (repeatable, or comma-separated),
--owner only those created by that certificate CN, --limit N stops after N
jobs, --newest-first starts from the newest.

examples:
  jobworker list
  jobworker list --status RUNNING
  jobworker list --status failed,stopped --owner alice --limit 20
  jobworker list --newest-first --limit 10
""",
    ),
    "stop": ("Stop a running job.", "example:\n  jobworker stop 1\n"),
    "delete": (
        "Delete an ended job: its record, output and files.",
        """\
The job must have ended (a running job: stop it first). Its id is never used
again; streams of it still open end first.

example:
  jobworker delete 1
""",
    ),
    "stream": (
        "Stream job output in real-time.",
        """\
The job's output goes to stdout as raw bytes; the banner and the final status
go to stderr, so "jobworker stream 1 > out.log" captures only the job's output.
With -o json, stdout gets one JSON object per chunk and line (JSON Lines):
{"offset": N, "payload": "<base64>"}, N counting bytes from the job's first.
With --follow=false (or --no-follow), print the output so far and exit: the
whole output if the job has ended, otherwise the bytes it had written when the
stream opened.

--offset N starts at byte N of the output (0 is the first; past the end: waits
for the job to write that far, or fails if the job has ended); a negative N
counts from the end: --offset -4096 prints the last 4 KiB, then follows.
--tail N starts at the last N lines instead (as tail -n N does; 0: only what
comes next). Either combines with --follow=false.

examples:
  jobworker stream 1
  jobworker stream 1 --follow
  jobworker stream --follow=false 1
  jobworker stream --tail 20 1
  jobworker stream --offset -4096 --follow=false 1
  jobworker stream --offset 1048576 1
""",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError instead of printed usage + exit."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[-1] if " " in self.prog else None
        raise UsageError(message, command)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {INT32_MAX}: {text}")
    return value


def _offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be between {INT64_MIN} and {INT64_MAX}: {text}")
    return value


def _line_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of lines: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


# --timeout of create: whole seconds, or with a unit (30s, 5m, 2h).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def _job_timeout(text: str) -> int:
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        value = int(number) * DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a whole number of seconds (or 5m, 2h): {text!r}"
        ) from None
    if not 0 <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {INT32_MAX} seconds: {text}")
    return value


def _env_variable(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _statuses(text: str) -> list[str]:
    """``--status``: one or more comma-separated statuses, in any case."""
    names = [word.strip().upper() for word in text.split(",") if word.strip()]
    known = [status.value for status in JobStatus]
    for name in names:
        if name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown status {name!r} (expected one of {', '.join(known)})"
            )
    if not names:
        raise argparse.ArgumentTypeError("expected a status, e.g. RUNNING")
    return names


def _limit(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return value


def _server_address(text: str) -> str:
    try:
        parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_output(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default=default,
        help="output format (default text); json: one object (a list: an array); for stream,"
        " one object per chunk and line, with its offset and base64 payload",
    )


def _add_connection_flags(
    parser: argparse._ActionsContainer,
    *,
    timeout_default: object,
    default: object,
    call_timeout: bool = True,
) -> None:
    """The global flags. Every subcommand takes them too (as kubectl does); there they
    default to SUPPRESS, so that only a flag actually given overrides the global one.
    Without ``call_timeout`` (create, whose --timeout is the job's) --timeout is left out."""
    parser.add_argument(
        "--server",
        type=_server_address,
        default=default,
        help=f'server address host:port (default "{DEFAULT_SERVER}", or ${ENV_SERVER})',
    )
    parser.add_argument(
        "--cert",
        default=default,
        help=f'client certificate path (default "{DEFAULT_CERTS_DIR}/{CERT_FILE}")',
    )
    parser.add_argument(
        "--key",
        default=default,
        help=f'client private key path (default "{DEFAULT_CERTS_DIR}/{KEY_FILE}")',
    )
    parser.add_argument(
        "--ca",
        default=default,
        help=f'CA certificate path (default "{DEFAULT_CERTS_DIR}/{CA_FILE}")',
    )
    if not call_timeout:
        return
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=timeout_default,
        metavar="SECONDS",
        help="limit for connecting and for each call; streaming has none"
        f" (default {DEFAULT_TIMEOUT_S:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jobworker",
        description="Client of the job worker: run, inspect, stop, delete and stream jobs.",
        epilog=MAIN_EPILOG,
        formatter_class=_formatter,
    )
    _add_connection_flags(parser, timeout_default=DEFAULT_TIMEOUT_S, default=None)
    _add_output(parser, default=None)
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    commands = parser.add_subparsers(dest="name", metavar="<command>", required=True)

    def command(name: str) -> argparse.ArgumentParser:
        summary, epilog = COMMAND_HELP[name]
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=summary, epilog=epilog, formatter_class=_formatter
        )
        _add_output(sub, default=argparse.SUPPRESS)
        global_flags = sub.add_argument_group("global options (also before the command)")
        _add_connection_flags(
            global_flags,
            timeout_default=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            call_timeout=name != "create",
        )
        return sub

    create = command("create")
    for flag, what, default in (
        ("--max-cpu", "max CPU percentage of one core", 100),
        ("--max-memory", "max memory in MB", 512),
        ("--max-iobps", "max I/O bytes per second, 0 = unlimited", 0),
    ):
        create.add_argument(
            flag,
            type=_non_negative_int,
            default=0,
            metavar="N",
            help=f"{what} (server default {default})",
        )
    create.add_argument(
        "--timeout",
        "--time-limit",
        dest="job_timeout",
        type=_job_timeout,
        default=0,
        metavar="SECONDS",
        help="stop the job after this long (30, 30s, 5m, 2h), recorded FAILED "
        '"timed out after N s" (default 0: the server\'s default)',
    )
    create.add_argument(
        "--env",
        type=_env_variable,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="add a variable to the job's environment (repeatable; PATH too)",
    )
    create.add_argument(
        "--workdir",
        default="",
        metavar="DIR",
        help="the job's working directory, an absolute path on the server's host "
        "(default: a scratch dir of its own)",
    )
    create.add_argument(
        "--request-id",
        default="",
        metavar="ID",
        help=f"idempotency key, up to {MAX_REQUEST_ID_CHARS} printable ASCII characters"
        " (default: a fresh random one): a create with a key your certificate sent within"
        f" {REQUEST_ID_TTL_S // 3600} h returns that job and starts none",
    )
    create.add_argument(
        "command",
        metavar="<command>",
        help="the command to run: a name looked up in the job's PATH, or an absolute path",
    )
    create.add_argument(
        "args", metavar="[args...]", nargs=argparse.REMAINDER, help="its arguments, untouched"
    )

    command("get").add_argument("job_id", metavar="<job-id>")
    listing = command("list")
    listing.add_argument(
        "--status",
        dest="statuses",
        type=_statuses,
        action="append",
        default=[],
        metavar="STATUS",
        help="only jobs in this status (repeatable, or comma-separated: RUNNING,FAILED)",
    )
    listing.add_argument(
        "--owner", default="", metavar="CN", help="only jobs created by this certificate CN"
    )
    listing.add_argument(
        "--limit", type=_limit, default=None, metavar="N", help="stop after N jobs"
    )
    listing.add_argument(
        "--newest-first", action="store_true", help="the newest job first (default: oldest)"
    )
    command("stop").add_argument("job_id", metavar="<job-id>")
    command("delete").add_argument("job_id", metavar="<job-id>")

    stream = command("stream")
    follow = stream.add_mutually_exclusive_group()
    follow.add_argument(
        "-f",
        "--follow",
        dest="follow",
        action="store_true",
        default=True,
        help="follow the output until the job ends (the default); also --follow=true|false",
    )
    follow.add_argument(
        "--no-follow", dest="follow", action="store_false", help="print the output so far and exit"
    )
    start = stream.add_mutually_exclusive_group()
    start.add_argument(
        "--offset",
        "--from-offset",
        dest="offset",
        type=_offset,
        default=0,
        metavar="N",
        help="start at byte N of the output (default 0); negative: N bytes before the end",
    )
    start.add_argument(
        "--tail",
        dest="tail",
        type=_line_count,
        default=None,
        metavar="N",
        help="start at the last N lines of the output",
    )
    stream.add_argument(
        "--no-retry",
        dest="retry",
        action="store_false",
        help="fail when the connection drops, instead of reconnecting and resuming"
        " (up to 3 times, with backoff) at the byte reached",
    )
    stream.add_argument("job_id", metavar="<job-id>")
    return parser


_GLOBAL_OPTIONS_WITH_VALUE = frozenset(
    {"--server", "--cert", "--key", "--ca", "--timeout", "-o", "--output"}
)
_CREATE_OPTIONS_WITH_VALUE = _GLOBAL_OPTIONS_WITH_VALUE | {
    "--max-cpu",
    "--max-memory",
    "--max-iobps",
    "--time-limit",
    "--env",
    "--workdir",
    "--request-id",
}
_END_OF_OPTIONS = "--"


@dataclass(frozen=True)
class _Split:
    """argv cut where argparse must stop: what it parses, and a create's job arguments."""

    for_argparse: list[str]
    command_name: str | None
    job_args: tuple[str, ...] = ()


def _skip_options(argv: list[str], start: int, with_value: frozenset[str]) -> int:
    """Index of the first positional (or of "--") at or after ``start``."""
    index = start
    while index < len(argv):
        word = argv[index]
        if word == _END_OF_OPTIONS or not word.startswith("-") or word == "-":
            return index
        index += 2 if word in with_value else 1
    return index


def _split(argv: list[str]) -> _Split:
    """Find the subcommand; for create, cut after the job's command; for stream, rewrite
    ``--follow=VALUE`` (argparse flags take no value)."""
    index = _skip_options(argv, 0, _GLOBAL_OPTIONS_WITH_VALUE)
    if index >= len(argv) or argv[index] == _END_OF_OPTIONS:
        return _Split(argv, None)
    name = argv[index]
    if name == "create":
        # argparse would drop a "--" among the job's arguments; the job gets them verbatim.
        at = _skip_options(argv, index + 1, _CREATE_OPTIONS_WITH_VALUE)
        if at < len(argv) and argv[at] == _END_OF_OPTIONS:
            at += 1
        return _Split(argv[: at + 1], name, tuple(argv[at + 1 :]))
    if name != "stream":
        return _Split(argv, name)
    rewritten = argv[: index + 1]
    for position, word in enumerate(argv[index + 1 :], start=index + 1):
        if word == _END_OF_OPTIONS:
            return _Split(rewritten + argv[position:], name)
        rewritten.append(_follow_flag(word))
    return _Split(rewritten, name)


def _follow_flag(word: str) -> str:
    name, equals, value = word.partition("=")
    if not equals or name not in ("--follow", "-f"):
        return word
    answer = value.strip().lower()
    if answer in TRUE_WORDS:
        return "--follow"
    if answer in FALSE_WORDS:
        return "--no-follow"
    raise UsageError(f"argument {name}: expected true or false, got {value!r}", "stream")


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Command:
    """Parse a command line (without the program name) into a Command.

    Flags beat the environment (JOB_WORKER_SERVER, JOB_WORKER_CERT_PATH),
    which beats the defaults. Raises UsageError; --help/--version print and
    raise SystemExit(0).
    """
    environ = os.environ if environ is None else environ
    split = _split(list(argv))
    try:
        ns = build_parser().parse_args(split.for_argparse)
    except UsageError as error:
        # The main parser's own errors are about global flags or the command's name, which
        # `jobworker --help` documents; stray words after a command are that command's.
        stray = str(error).startswith("unrecognized arguments")
        if error.command is None and stray and split.command_name in COMMAND_HELP:
            error.command = split.command_name
        raise
    if ns.name == "create":
        if not ns.command:
            raise UsageError("the command must not be empty", "create")
        ns.args = [*ns.args, *split.job_args]
    env_server = environ.get(ENV_SERVER, "").strip()
    if ns.server is None and env_server:
        try:
            parse_server(env_server)
        except ValueError as exc:
            raise UsageError(f"{ENV_SERVER}: {exc}") from None
    certs_dir = environ.get(ENV_CERT_PATH, "").strip() or DEFAULT_CERTS_DIR
    connection = Connection(
        server=ns.server or env_server or DEFAULT_SERVER,
        cert=ns.cert or str(Path(certs_dir) / CERT_FILE),
        key=ns.key or str(Path(certs_dir) / KEY_FILE),
        ca=ns.ca or str(Path(certs_dir) / CA_FILE),
        timeout=ns.timeout,
    )
    return Command(
        name=ns.name,
        connection=connection,
        output=ns.output or "text",
        job_id=getattr(ns, "job_id", ""),
        command=getattr(ns, "command", ""),
        args=tuple(getattr(ns, "args", ())),
        max_cpu=getattr(ns, "max_cpu", 0),
        max_memory=getattr(ns, "max_memory", 0),
        max_iobps=getattr(ns, "max_iobps", 0),
        timeout_seconds=getattr(ns, "job_timeout", 0),
        env=tuple(getattr(ns, "env", ())),
        working_dir=getattr(ns, "workdir", ""),
        request_id=getattr(ns, "request_id", ""),
        follow=getattr(ns, "follow", True),
        offset=getattr(ns, "offset", 0),
        tail=getattr(ns, "tail", None),
        retry=getattr(ns, "retry", True),
        statuses=tuple(name for group in getattr(ns, "statuses", ()) for name in group),
        owner=getattr(ns, "owner", ""),
        limit=getattr(ns, "limit", None),
        newest_first=getattr(ns, "newest_first", False),
    )


def print_usage_error(error: UsageError) -> None:
    """One line on stderr: ``Error: <message> (see 'jobworker [<command>] --help')``."""
    where = f"jobworker {error.command} --help" if error.command else "jobworker --help"
    print(f"Error: {escape(str(error))} (see '{where}')", file=sys.stderr)
