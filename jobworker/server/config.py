"""The server's configuration, as resolved from flags, environment and file (see main.py,
settings.py), and the error for a server that cannot start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jobworker.cgroups.base import DEFAULT_PIDS_MAX
from jobworker.cgroups.detect import CgroupMode
from jobworker.engine.retention import RETENTION_INTERVAL_S, RetentionPolicy
from jobworker.engine.supervision import STOP_GRACE_S
from jobworker.launch.users import DEFAULT_UID_RANGE
from jobworker.server.quotas import RoleLimits
from jobworker.server.ratelimit import RateLimit
from jobworker.wire.contract import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT
from jobworker.wire.core import WireLimits
from jobworker.wire.keepalive import KeepalivePolicy


class StartupError(Exception):
    """A reason the server cannot start, as one line for the operator (the server exits 2)."""


DEFAULT_HANDSHAKE_TIMEOUT_S = 5.0  # a TLS handshake takes ms; this is for slow links, not stalls
DEFAULT_STOP_GRACE_S = STOP_GRACE_S  # the spec: SIGKILL 100 ms after SIGTERM
DEFAULT_MAX_CONCURRENT_STREAMS = WireLimits.max_concurrent_streams  # per connection
DEFAULT_MAX_CONNECTIONS = 1000  # well under the default fd limit of 1024 + our own files
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a connection with no RPC for this long is closed (GOAWAY)
# Read at most this much at a time: what a peer makes us owe it (PING and SETTINGS acks) per
# read stays small before the writer's backpressure is looked at again.
RECEIVE_CHUNK = 65_536


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits (the hardening knobs)."""

    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    keepalive: KeepalivePolicy = field(default_factory=KeepalivePolicy)

    @property
    def wire(self) -> WireLimits:
        """The wire core's limits for a connection: one maximal request fits a stream's
        window, two the connection's."""
        return WireLimits(
            max_message_bytes=self.max_message_bytes,
            max_concurrent_streams=self.max_concurrent_streams,
            receive_chunk=RECEIVE_CHUNK,
        )


@dataclass(frozen=True)
class ServerConfig:
    """Everything serve() needs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    certs_dir: Path = Path("certs")
    data_dir: Path = Path("var")
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    stop_grace: float = DEFAULT_STOP_GRACE_S
    default_job_timeout: int | None = None  # seconds, for a job that asks for none
    max_job_timeout: int | None = None  # seconds; None: no maximum
    cgroups: CgroupMode = "auto"
    isolation: str = "auto"  # --isolation, validated (parse_isolation)
    job_user: str | None = None  # None: a uid of its own per running job
    job_uid_range: str = DEFAULT_UID_RANGE
    pids_max: int = DEFAULT_PIDS_MAX
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    min_free_disk: int | None = None  # None: the engine's default for the data disk
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)  # default: keep all
    retention_interval: float = RETENTION_INTERVAL_S  # seconds between retention sweeps
    max_output_bytes: int | None = None  # output kept per job; None: all of it
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    metrics_listen: tuple[str, int] | None = None  # Prometheus /metrics address; None: off
    max_running_jobs: int | None = None  # INITIALIZING or RUNNING at once; None: no limit
    max_running_jobs_per_client: int | None = None  # the same, per certificate CN
    role_limits: RoleLimits | None = None  # what a job of each role may ask for; None: any
    rate_limit: RateLimit | None = None  # job service calls per client CN; None: no limit
