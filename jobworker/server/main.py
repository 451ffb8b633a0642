"""``jobworker-server``: its flags, logging, and the exit codes.

The parser built by ``build_parser`` is the one list of settings: each flag is also a key of
the ``--config`` TOML file and a ``JOB_WORKER_<FLAG>`` environment variable (settings.py).
To add a setting: one ``add_argument`` in ``build_parser`` (its default imported from the
layer that owns it), read it in ``config_from_args``, and one entry in
``deploy/server.toml`` (a test compares that file with this parser). The file, the
environment, ``--print-config`` and the checks follow from the parser by themselves.

Exit codes: 0 after a graceful shutdown (and after ``--print-config``); 2 when the server
cannot start (bad flag or setting, unreadable certificates, an unusable or busy data dir,
the address cannot be bound, ``--cgroups require`` without usable cgroups, and any other
failure before it listens: its exception's class named, the traceback logged at DEBUG),
always as one line on stderr; 1 when the server failed after it started.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import trio

from jobworker.cgroups.base import DEFAULT_PIDS_MAX
from jobworker.cgroups.detect import CgroupsUnavailable
from jobworker.engine.manager import DEFAULT_MIN_FREE_DISK_BYTES, MIN_FREE_DISK_FRACTION
from jobworker.engine.retention import RETENTION_INTERVAL_S, RetentionPolicy, parse_duration
from jobworker.engine.spec import MAX_TIMEOUT_SECONDS
from jobworker.engine.store import DataDirUnusable
from jobworker.errors import unwrap
from jobworker.launch.isolation import IsolationUnusable, parse_isolation
from jobworker.launch.users import DEFAULT_UID_RANGE, UsersUnusable, parse_uid_range
from jobworker.server import config as cfg
from jobworker.server.app import serve
from jobworker.server.check import run_check
from jobworker.server.config import StartupError
from jobworker.server.listener import format_address
from jobworker.server.logs import LOG_FORMATS, LOG_LEVELS, announce, setup_logging
from jobworker.server.metrics_http import MetricsListenError
from jobworker.server.quotas import parse_role_limits
from jobworker.server.ratelimit import parse_rate_limit
from jobworker.server.settings import CONFIG_ENV, ConfigError, render, resolve
from jobworker.server.tls import build_server_context
from jobworker.wire.contract import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT
from jobworker.wire.keepalive import (
    DEFAULT_KEEPALIVE_MIN_PING_INTERVAL_S,
    DEFAULT_KEEPALIVE_TIME_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    KeepalivePolicy,
)

EXIT_CONFIG = 2  # argparse's code for usage errors; the same for every reason not to start
EXIT_RUNTIME = 1
PROG = "jobworker-server"


class Address(NamedTuple):
    """A --listen address; ``str()`` gives it back as typed (``[::1]:50051``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (the usage itself is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see --help)\n")


def parse_listen(value: str) -> Address:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port)."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise argparse.ArgumentTypeError(f"expected [HOST]:PORT, got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise argparse.ArgumentTypeError(
                f"expected HOST:PORT (IPv6 as [ADDR]:PORT), got {value!r}"
            )
    if not host:
        raise argparse.ArgumentTypeError(f"missing host in {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return Address(host, port)


def _bounded(
    convert: Callable[[str], float], noun: str, low: float, *, inclusive: bool
) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, refuse values below ``low`` (or equal to it
    unless ``inclusive``) and NaN."""

    def parse(value: str) -> float:
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {value!r}") from None
        if not (number >= low if inclusive else number > low):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {low}: {value!r}"
            )
        return number

    return parse


_positive_float = _bounded(float, "a number", 0, inclusive=False)
_non_negative_float = _bounded(float, "a number", 0, inclusive=True)
_positive_int = _bounded(int, "an integer", 1, inclusive=True)
_non_negative_int = _bounded(int, "an integer", 0, inclusive=True)


def _timeout_seconds(value: str) -> int:
    """A job time limit: whole seconds, 1 to what timeoutSeconds (an int32) can carry."""
    seconds = int(_positive_int(value))
    if seconds > MAX_TIMEOUT_SECONDS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_TIMEOUT_SECONDS}: {value!r}")
    return seconds


def _duration(value: str) -> float:
    """A retention age: 7d, 12h, 30m, 90s or plain seconds."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _isolation_text(value: str) -> str:
    try:
        parse_isolation(value)
    except IsolationUnusable as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value.strip()


def _uid_range_text(value: str) -> str:
    try:
        start, end = parse_uid_range(value)
    except UsersUnusable as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{start}-{end}"


def build_parser() -> argparse.ArgumentParser:
    """The server's flags: every one but the meta options (``--config``, ``--print-config``,
    ``--check``) is a setting (see settings.py)."""
    parser = OneLineParser(
        prog=PROG,
        description="Run Linux commands as jobs under resource limits, over gRPC with mTLS. "
        "Every flag can also be set in the --config file (key: the flag without dashes) or "
        "as JOB_WORKER_<FLAG> (e.g. JOB_WORKER_DATA_DIR); flags win, then the environment, "
        "then the file.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"TOML file of settings (or ${CONFIG_ENV}; example: deploy/server.toml)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML, each value's source as a comment, "
        "and exit",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check certificates, data dir, resource control, job user and isolation without "
        "binding the port; exit 0 if the server would start, 2 if not",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="address to listen on, only this one ([::1]:PORT for IPv6; port 0 picks one) "
        f"(default 127.0.0.1:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--certs-dir",
        type=Path,
        default=Path("certs"),
        metavar="DIR",
        help="directory with ca-cert.pem, server-cert.pem, server-key.pem (default certs)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("var"),
        metavar="DIR",
        help="job records and output (default ./var)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="least severe level logged: DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text: one human-readable line per record; json: one JSON object per line "
        "(default text)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_positive_float,
        default=cfg.DEFAULT_HANDSHAKE_TIMEOUT_S,
        metavar="SECONDS",
        help="drop a connection whose TLS handshake takes longer (default %(default)s)",
    )
    parser.add_argument(
        "--stop-grace",
        type=_non_negative_float,
        default=cfg.DEFAULT_STOP_GRACE_S,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when stopping a job (default %(default)s)",
    )
    parser.add_argument(
        "--default-job-timeout",
        type=_timeout_seconds,
        default=None,
        metavar="SECONDS",
        help="time limit of a job that asks for none (timeoutSeconds 0): stopped then, and "
        "recorded FAILED (default: none; with --max-job-timeout, that maximum)",
    )
    parser.add_argument(
        "--max-job-timeout",
        type=_timeout_seconds,
        default=None,
        metavar="SECONDS",
        help="largest timeoutSeconds a job may ask for; more is INVALID_ARGUMENT "
        "(default: no maximum)",
    )
    parser.add_argument(
        "--max-running-jobs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="jobs that may run (INITIALIZING or RUNNING) at once; CreateJob beyond is "
        "RESOURCE_EXHAUSTED (default: no limit)",
    )
    parser.add_argument(
        "--max-running-jobs-per-client",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the same, per client certificate CN (default: no limit)",
    )
    parser.add_argument(
        "--role-limits",
        type=parse_role_limits,
        default=None,
        metavar="ROLE:KEY=N,...[;ROLE:...]",
        help="the most a job created by a role may ask for, keys cpu (percent), memory (MB), "
        "iobps (bytes/s), timeout (seconds), e.g. admin:cpu=400,memory=8192; more is "
        "INVALID_ARGUMENT (default: no ceilings)",
    )
    parser.add_argument(
        "--rate-limit",
        type=parse_rate_limit,
        default=None,
        metavar="RATE[/s],BURST",
        help="job service calls per client certificate CN: a token bucket of BURST tokens "
        "refilled at RATE per second, e.g. 20/s,40; over it, RESOURCE_EXHAUSTED (health "
        "checks and reflection are never limited) (default: no limit)",
    )
    parser.add_argument(
        "--cgroups",
        choices=["auto", "require", "off"],
        default="auto",
        help="resource control: auto (cgroups if usable, else a loud warning), require, off "
        "(default auto)",
    )
    parser.add_argument(
        "--pids-max",
        type=_positive_int,
        default=DEFAULT_PIDS_MAX,
        metavar="N",
        help="max processes per job (default %(default)s)",
    )
    parser.add_argument(
        "--isolation",
        type=_isolation_text,
        default="auto",
        metavar="auto|none|LIST",
        help="namespaces every job gets of its own: auto (pid, mount and cgroup where the host "
        "allows them), none, or a comma-separated list of pid, mount, cgroup, net; a listed "
        "one the host cannot provide refuses the start (default %(default)s)",
    )
    parser.add_argument(
        "--job-user",
        type=str,
        default=None,
        metavar="NAME|UID:GID|root",
        help="run every job as this user; root keeps the server's privileges (for single-user "
        "machines) (default: each running job gets its own uid from --job-uid-range)",
    )
    parser.add_argument(
        "--job-uid-range",
        type=_uid_range_text,
        default=DEFAULT_UID_RANGE,
        metavar="START-END",
        help="uids (and gids) handed to running jobs, one each; no /etc/passwd, /etc/group, "
        "/etc/subuid or /etc/subgid entry may lie in it (default %(default)s)",
    )
    parser.add_argument(
        "--min-free-disk",
        type=_non_negative_int,
        default=None,
        metavar="BYTES",
        help="refuse CreateJob (RESOURCE_EXHAUSTED) while the data disk has less free space "
        f"(default: {MIN_FREE_DISK_FRACTION * 100:g}%% of it, at least "
        f"{DEFAULT_MIN_FREE_DISK_BYTES // 2**20} MiB)",
    )
    parser.add_argument(
        "--retain-finished",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="delete finished jobs (record and output) this long after they ended: 7d, 12h, "
        "30m, 90s or seconds; never a running job (default: keep them)",
    )
    parser.add_argument(
        "--retain-finished-count",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="keep at most the newest N finished jobs, deleting the oldest (by id) beyond "
        "them; running jobs are not counted (default: no limit)",
    )
    parser.add_argument(
        "--retention-interval",
        type=_positive_float,
        default=RETENTION_INTERVAL_S,
        metavar="SECONDS",
        help="how often --retain-finished and --retain-finished-count are applied (and once "
        "at start) (default %(default)s)",
    )
    parser.add_argument(
        "--max-output-bytes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep at most N bytes of each job's output: the job runs on, the rest is "
        "discarded, the log ends with a marker line and the reason says so (default: no cap)",
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=_positive_int,
        default=cfg.DEFAULT_MAX_CONCURRENT_STREAMS,
        metavar="N",
        help="concurrent RPCs per connection, advertised and enforced (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=cfg.DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections; more are closed at once (default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=cfg.DEFAULT_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="close a connection with no RPC for this long (client PINGs do not count); "
        "also the time a client has to send a request it started (default %(default)s)",
    )
    parser.add_argument(
        "--keepalive-time",
        type=_positive_float,
        default=DEFAULT_KEEPALIVE_TIME_S,
        metavar="SECONDS",
        help="PING a connection on which nothing arrived for this long (default %(default)s)",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=_positive_float,
        default=DEFAULT_KEEPALIVE_TIMEOUT_S,
        metavar="SECONDS",
        help="close a connection whose peer leaves that PING unanswered this long "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--keepalive-min-ping-interval",
        type=_non_negative_float,
        default=DEFAULT_KEEPALIVE_MIN_PING_INTERVAL_S,
        metavar="SECONDS",
        help="a client PING sooner than this after its previous one is a strike; the third "
        "gets GOAWAY ENHANCE_YOUR_CALM (0: no limit) (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metavar="N",
        help="largest request message accepted (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=parse_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics (port 0 "
        "picks one) (default: off)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> cfg.ServerConfig:
    """The ServerConfig of resolved settings; ConfigError for settings that contradict each
    other."""
    default_timeout, max_timeout = args.default_job_timeout, args.max_job_timeout
    if default_timeout is not None and max_timeout is not None and default_timeout > max_timeout:
        raise ConfigError(
            f"default-job-timeout ({default_timeout} s) is above max-job-timeout ({max_timeout} s)"
        )
    host, port = args.listen
    return cfg.ServerConfig(
        host=host,
        port=port,
        certs_dir=args.certs_dir,
        data_dir=args.data_dir,
        handshake_timeout=args.handshake_timeout,
        stop_grace=args.stop_grace,
        default_job_timeout=default_timeout,
        max_job_timeout=max_timeout,
        cgroups=args.cgroups,
        isolation=args.isolation,
        job_user=args.job_user,
        job_uid_range=args.job_uid_range,
        pids_max=args.pids_max,
        max_connections=args.max_connections,
        min_free_disk=args.min_free_disk,
        retention=RetentionPolicy(
            max_age=args.retain_finished, max_count=args.retain_finished_count
        ),
        retention_interval=args.retention_interval,
        max_output_bytes=args.max_output_bytes,
        limits=cfg.ConnectionLimits(
            max_concurrent_streams=args.max_concurrent_streams,
            max_message_bytes=args.max_message_bytes,
            idle_timeout=args.idle_timeout,
            keepalive=KeepalivePolicy(
                time=args.keepalive_time,
                timeout=args.keepalive_timeout,
                min_ping_interval=args.keepalive_min_ping_interval,
            ),
        ),
        metrics_listen=args.metrics_listen,
        max_running_jobs=args.max_running_jobs,
        max_running_jobs_per_client=args.max_running_jobs_per_client,
        role_limits=args.role_limits,
        rate_limit=args.rate_limit,
    )


# Each connection holds one descriptor, each running job about four (pipe, pidfd, OOM eventfd,
# output log) and each stream reader catching up one more: the usual soft limit of 1024 is
# below --max-connections' default alone.
_log = logging.getLogger("jobworker.server")
FDS_PER_CONNECTION = 1
FD_HEADROOM = 1024  # jobs, readers, records, logs


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn if it still looks too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            _log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
            target = soft
    needed = max_connections * FDS_PER_CONNECTION + FD_HEADROOM
    if target < needed:
        _log.warning(
            "open-file limit %d is below what --max-connections %d may need (~%d)",
            target,
            max_connections,
            needed,
        )


def _fail(message: str) -> NoReturn:
    """One line on stderr (after any queued log lines), exit 2."""
    announce(f"{PROG}: {message}", "start_failed", logging.ERROR)
    sys.exit(EXIT_CONFIG)


class _Serving(trio.TaskStatus[tuple[str, int]]):
    """serve()'s task_status: set once it listens. What fails before that is a reason not to
    start (exit 2), what fails after it a failure of a server that was serving (exit 1)."""

    def __init__(self) -> None:
        self.serving = False

    def started(self, value: tuple[str, int] | None = None) -> None:
        self.serving = True


def _unexpected(exc: BaseException) -> str:
    """An unexpected reason not to start, in one line: its class and what it says."""
    while isinstance(exc, BaseExceptionGroup):  # several at once: the first says enough
        exc = unwrap(exc.exceptions[0])
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    return f"cannot start: {type(exc).__name__}: {' '.join(text.split())}"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``jobworker-server``; exits the process."""
    parser = build_parser()
    try:
        resolved = resolve(parser, sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        _fail(str(exc))
    args = resolved.args
    if args.print_config:
        sys.stdout.write(render(resolved))
        sys.exit(0)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        _fail(str(exc))
    if args.check:
        sys.exit(0 if run_check(config, print) else EXIT_CONFIG)
    setup_logging(args.log_level, args.log_format)
    raise_fd_limit(config.max_connections)
    serving = _Serving()
    try:
        ssl_context = build_server_context(config.certs_dir)
        trio.run(functools.partial(serve, config, ssl_context, task_status=serving))
    except Exception as exc:
        leaf = unwrap(exc)
        if not serving.serving:
            # Every reason not to start is one line and exit 2: the expected ones in their
            # own words (the engine's refusal of an unusable jobs dir and the metrics address
            # are not StartupErrors: other layers), anything else with its class.
            if isinstance(
                leaf, StartupError | CgroupsUnavailable | DataDirUnusable | MetricsListenError
            ):
                _fail(str(leaf))
            _log.debug("the start failed", exc_info=exc)
            _fail(_unexpected(leaf))
        _log.critical("server failed", exc_info=exc)
        sys.exit(EXIT_RUNTIME)
    sys.exit(0)
