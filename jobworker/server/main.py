"""``jobworker-server``: command-line flags, logging, and the exit codes.

Exit codes: 0 after a graceful shutdown; 2 for a configuration problem (bad flag,
unreadable certificates, ``--cgroups require`` on a host without usable cgroups);
1 when the address cannot be bound; 130 when a second signal forced the exit.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from jobworker.cgroups.base import DEFAULT_PIDS_MAX
from jobworker.cgroups.detect import CgroupsUnavailable
from jobworker.server import config as cfg
from jobworker.server.app import DataDirBusy, ListenError, serve
from jobworker.server.errors import unwrap
from jobworker.server.logs import setup_logging
from jobworker.server.tls import CertificateError, build_server_context

EXIT_CONFIG = 2  # argparse's code for usage errors; the same for every configuration problem
EXIT_RUNTIME = 1

Address = tuple[str, int]


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
    return host, port


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobworker-server",
        description="Run Linux commands as jobs under resource limits, over gRPC with mTLS.",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", cfg.DEFAULT_PORT),
        metavar="HOST:PORT",
        help="address to listen on, only this one ([::1]:PORT for IPv6; port 0 picks one) "
        f"(default 127.0.0.1:{cfg.DEFAULT_PORT})",
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
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default INFO)",
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
        "--max-message-bytes",
        type=_positive_int,
        default=cfg.DEFAULT_MAX_MESSAGE_BYTES,
        metavar="N",
        help="largest request message accepted (default %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> cfg.ServerConfig:
    host, port = args.listen
    return cfg.ServerConfig(
        host=host,
        port=port,
        certs_dir=args.certs_dir,
        data_dir=args.data_dir,
        handshake_timeout=args.handshake_timeout,
        stop_grace=args.stop_grace,
        cgroups=args.cgroups,
        pids_max=args.pids_max,
        max_connections=args.max_connections,
        limits=cfg.ConnectionLimits(
            max_concurrent_streams=args.max_concurrent_streams,
            max_message_bytes=args.max_message_bytes,
            idle_timeout=args.idle_timeout,
        ),
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``jobworker-server``; exits the process."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    config = config_from_args(args)
    raise_fd_limit(config.max_connections)
    try:
        ssl_context = build_server_context(config.certs_dir)
    except CertificateError as exc:
        print(f"jobworker-server: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        trio.run(serve, config, ssl_context)
    except Exception as exc:
        leaf = unwrap(exc)
        if isinstance(leaf, CgroupsUnavailable | DataDirBusy):
            print(f"jobworker-server: {leaf}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        if isinstance(leaf, ListenError):
            print(f"jobworker-server: {leaf}", file=sys.stderr)
            sys.exit(EXIT_RUNTIME)
        _log.critical("server failed", exc_info=exc)
        sys.exit(EXIT_RUNTIME)
    sys.exit(0)
