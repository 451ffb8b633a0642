"""Shared tooling for the attack suite: measuring the server, a well-behaved probe, raw clients.

- ``resources(pid)`` / ``wait_resources_back(...)``: server RSS and open fd count from /proc.
- ``pattern(n)`` and ``pattern_job(...)``: a known byte sequence and a job that writes it, so
  every reader's output can be checked byte for byte (sha256).
- ``Probe`` / ``ProbeLoop`` / ``assert_unaffected``: a well-behaved grpcio client (GetJob + a
  short stream of a finished job) whose latencies are measured before and during an attack.
- ``RawH2``: a TLS + HTTP/2 client driven by hand with ``h2``, to misbehave at will.

Everything here is bounded: every wait has a deadline, every loop a limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from jobworker.api import worker_pb2, worker_pb2_grpc
from jobworker.engine import JobStatus
from tests.support import JOB_PYTHON, grpc_credentials, job_request

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerProc

MiB = 1024 * 1024
SERVICE = "job_worker.JobService"

# What "unaffected" means for a well-behaved client while an attack runs. Generous on
# purpose: the attacker, the probe, the server and the jobs share two cores.
LATENCY_FACTOR = 10  # p50 during the attack may be this many times the baseline p50 ...
# ... or this, whichever is larger: a 1 ms baseline is noise-bound, and two cores shared by
# the server, its jobs, the attacker and the probe (and, on a dev box, other test runs) make
# tens of ms common. A server slowed by an attack shows seconds, or errors.
LATENCY_FLOOR_S = 0.2
MAX_CALL_S = 2.0  # and no single probe call may take longer than this
PROBE_TIMEOUT_S = 5.0  # a probe call that takes this long counts as failed, not hung
MIN_PROBES_DURING = 3  # an attack shorter than a few probes proves nothing

# What "back to baseline" means once the attack is over.
FD_SLACK = 4  # the log file rotation, a lingering probe socket, the job's pipe
RSS_SLACK = 30 * MiB  # Python does not give every freed arena back to the OS
SETTLE_TIMEOUT_S = 15.0


# --------------------------------------------------------------------------------------------
# Server resources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """A process's resident memory (bytes) and open file descriptors."""

    rss: int
    fds: int

    def __str__(self) -> str:
        return f"rss={self.rss / MiB:.1f} MiB fds={self.fds}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def resources(pid: int) -> Resources:
    return Resources(rss=rss_bytes(pid), fds=fd_count(pid))


def wait_resources_back(
    pid: int,
    baseline: Resources,
    *,
    fd_slack: int = FD_SLACK,
    rss_slack: int = RSS_SLACK,
    timeout: float = SETTLE_TIMEOUT_S,
) -> Resources:
    """Poll until the server's fds are within ``fd_slack`` of ``baseline`` and its RSS within
    ``rss_slack`` above it; return the final reading, or fail with both readings."""
    deadline = time.monotonic() + timeout
    while True:
        now = resources(pid)
        if abs(now.fds - baseline.fds) <= fd_slack and now.rss - baseline.rss <= rss_slack:
            return now
        if time.monotonic() > deadline:
            fds = sorted(_fd_targets(pid))
            raise AssertionError(
                f"server resources did not return near baseline in {timeout}s: "
                f"baseline {baseline}, now {now}; open fds: {fds}"
            )
        time.sleep(0.05)


def _fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


class PeakRss:
    """Samples a process's RSS every ``interval`` seconds in a Trio task; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss_bytes(pid)

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_bytes(self.pid))
            await trio.sleep(self.interval)


# --------------------------------------------------------------------------------------------
# Known output
# --------------------------------------------------------------------------------------------

LINE_FILL = b"the quick brown fox jumps over the lazy dog 0123456"  # 51 bytes
LINE_BYTES = 64  # "%010d " (11) + fill (51) + "\n" + 1 spare "-" = 64 bytes a line
LINES_PER_WRITE = 1024  # 64 KiB per write(2)

# The job side of pattern(): writes the first TOTAL bytes of the pattern (forever if TOTAL < 0),
# LINES_PER_WRITE lines at a time, sleeping DELAY seconds between writes.
PATTERN_SCRIPT = f"""
import sys, time
total, delay = int(sys.argv[1]), float(sys.argv[2])
fill = {LINE_FILL!r}
out = sys.stdout.buffer
i = written = 0
while total < 0 or written < total:
    block = b"".join(b"%010d %s-\\n" % (j, fill) for j in range(i, i + {LINES_PER_WRITE}))
    i += {LINES_PER_WRITE}
    if total >= 0:
        block = block[: total - written]
    out.write(block)
    out.flush()
    written += len(block)
    if delay:
        time.sleep(delay)
"""


def pattern(size: int) -> bytes:
    """The first ``size`` bytes of the pattern the pattern job writes."""
    lines = -(-size // LINE_BYTES)
    data = b"".join(b"%010d %s-\n" % (j, LINE_FILL) for j in range(lines))
    return data[:size]


@lru_cache(maxsize=16)
def pattern_sha256(size: int) -> str:
    return hashlib.sha256(pattern(size)).hexdigest()


def pattern_job(total: int, delay: float = 0.0, **limits: int) -> worker_pb2.CreateJobReq:
    """A CreateJobReq for a job writing ``total`` pattern bytes (``-1``: until stopped)."""
    return job_request(JOB_PYTHON, ["-c", PATTERN_SCRIPT, str(total), repr(delay)], **limits)


def is_pattern_prefix(data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == pattern_sha256(len(data))


# --------------------------------------------------------------------------------------------
# grpcio: the well-behaved client
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def grpc_stub(
    address: str, test_pki: TestPKI, stem: str = "admin-client"
) -> Iterator[worker_pb2_grpc.JobServiceStub]:
    """A grpcio stub on a fresh channel (closed on exit), built as the spec's example does."""
    channel = grpc.secure_channel(address, grpc_credentials(test_pki, stem))
    try:
        yield worker_pb2_grpc.JobServiceStub(channel)
    finally:
        channel.close()


def wait_job_ended(
    stub: worker_pb2_grpc.JobServiceStub, job_id: str, timeout: float = 30.0
) -> worker_pb2.GetJobRes:
    """Poll GetJob until the job is in a terminal state; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(worker_pb2.GetJobReq(id=job_id), timeout=PROBE_TIMEOUT_S)
        if JobStatus(job.status).is_terminal:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")
        time.sleep(0.02)


def read_stream(stub: worker_pb2_grpc.JobServiceStub, job_id: str, timeout: float = 60.0) -> bytes:
    """The whole output of ``job_id`` through GetJobsStream (ends when the job ended)."""
    parts = [
        chunk.payload
        for chunk in stub.GetJobsStream(worker_pb2.GetJobsStreamReq(id=job_id), timeout=timeout)
    ]
    return b"".join(parts)


def output_file(srv: ServerProc, job_id: str) -> bytes:
    """What the server stored for ``job_id`` (the log every reader must see exactly)."""
    return (srv.data_dir / "jobs" / job_id / "output.log").read_bytes()


@dataclass(frozen=True)
class Sample:
    """One probe: GetJob latency, stream latency (whole short output), or the error."""

    get_s: float
    stream_s: float
    error: str | None = None


REFERENCE_SIZE = 128 * 1024  # the probe's stream: 2 messages, short enough to be a latency


class Probe:
    """A well-behaved client: GetJob of a finished reference job + a stream of its output,
    checked byte for byte. ``fresh=True`` opens a new connection (TLS handshake) per probe."""

    def __init__(self, address: str, test_pki: TestPKI, job_id: str, *, fresh: bool = False):
        self.address = address
        self.test_pki = test_pki
        self.job_id = job_id
        self.fresh = fresh
        self.expected = pattern_sha256(REFERENCE_SIZE)
        self._channel: grpc.Channel | None = None

    def _stub(self) -> tuple[worker_pb2_grpc.JobServiceStub, grpc.Channel]:
        if self.fresh or self._channel is None:
            credentials = grpc_credentials(self.test_pki, "admin-client")
            channel = grpc.secure_channel(self.address, credentials)
            if not self.fresh:
                self._channel = channel
        else:
            channel = self._channel
        return worker_pb2_grpc.JobServiceStub(channel), channel

    def once(self) -> Sample:
        stub, channel = self._stub()
        t0 = time.monotonic()
        get_s = stream_s = 0.0
        try:
            job = stub.GetJob(worker_pb2.GetJobReq(id=self.job_id), timeout=PROBE_TIMEOUT_S)
            get_s = time.monotonic() - t0
            if job.id != self.job_id or job.status != "COMPLETED":
                return Sample(get_s, 0.0, f"GetJob answered {job.id} {job.status}")
            t1 = time.monotonic()
            data = read_stream(stub, self.job_id, timeout=PROBE_TIMEOUT_S)
            stream_s = time.monotonic() - t1
            if hashlib.sha256(data).hexdigest() != self.expected:
                return Sample(get_s, stream_s, f"stream gave {len(data)} wrong bytes")
            return Sample(get_s, stream_s)
        except grpc.RpcError as exc:
            elapsed = time.monotonic() - t0
            return Sample(get_s or elapsed, stream_s, f"{exc.code()}: {exc.details()}")
        finally:
            if self.fresh:
                channel.close()

    def baseline(self, count: int = 15) -> list[Sample]:
        """``count`` probes in a row with nothing else going on (after one warm-up)."""
        self.once()
        samples = [self.once() for _ in range(count)]
        errors = [s.error for s in samples if s.error]
        assert not errors, f"the probe fails before any attack: {errors}"
        return samples

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def create_reference_job(stub: worker_pb2_grpc.JobServiceStub) -> str:
    """Create the probe's reference job (REFERENCE_SIZE pattern bytes) and wait for its end."""
    job = stub.CreateJob(pattern_job(REFERENCE_SIZE), timeout=PROBE_TIMEOUT_S)
    ended = wait_job_ended(stub, job.id)
    assert ended.status == "COMPLETED", ended
    return str(job.id)


# The probe runs in its own process: the attacker in the test process holds the GIL for long
# stretches (500 TLS handshakes, 1,000 streams), which would show up as probe latency.
PROBE_SCRIPT = """
import json, sys
from tests.integration.attacks.tools import Probe
from tests.conftest import TestPKI
address, pki_dir, job_id, fresh, pause = sys.argv[1:6]
import select, time
from pathlib import Path
probe = Probe(address, TestPKI(Path(pki_dir), None), job_id, fresh=fresh == "1")
probe.once()  # warm-up: first connection, first import of everything
while True:
    s = probe.once()
    print(json.dumps([s.get_s, s.stream_s, s.error]), flush=True)
    if select.select([sys.stdin], [], [], float(pause))[0]:
        break  # stdin closed (or written): stop
"""
BASELINE_PROBES = 15  # probes before the attack starts: the baseline of the same test
PROBE_START_TIMEOUT_S = 30.0


@dataclass
class ProbeLoop:
    """Runs the well-behaved probe back to back in a separate process.

    ``running()`` first collects BASELINE_PROBES samples (``baseline``), then yields while
    the attack runs; samples from then on are ``samples``. The process stops on exit."""

    address: str
    test_pki: TestPKI
    job_id: str
    fresh: bool = False
    pause: float = 0.01  # between probes: a client, not a load generator
    baseline: list[Sample] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ProbeLoop]:
        root = Path(__file__).resolve().parents[3]
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-c",
                PROBE_SCRIPT,
                self.address,
                str(self.test_pki.dir),
                self.job_id,
                "1" if self.fresh else "0",
                repr(self.pause),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdout = proc.stdout
        target = self.baseline
        enough = trio.Event()
        buffer = b""

        async def read() -> None:
            nonlocal buffer, target
            while True:
                chunk = await stdout.receive_some()
                if not chunk:
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    get_s, stream_s, error = json.loads(line)
                    target.append(Sample(get_s, stream_s, error))
                    if len(self.baseline) >= BASELINE_PROBES:
                        target = self.samples
                        enough.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                with trio.fail_after(PROBE_START_TIMEOUT_S):
                    await enough.wait()
                errors = [s.error for s in self.baseline if s.error]
                assert not errors, f"the probe fails before any attack: {errors}"
                try:
                    yield self
                finally:
                    await proc.stdin.aclose()  # the probe stops after its current call
        finally:
            with trio.move_on_after(PROBE_TIMEOUT_S * 3, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5, shield=True):
                    await proc.wait()
            await stdout.aclose()


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def assert_unaffected(baseline: Sequence[Sample], during: Sequence[Sample], what: str) -> str:
    """The well-behaved client kept working during ``what``: no error, enough probes, p50 of
    each call within LATENCY_FACTOR of the baseline, no call over MAX_CALL_S. Returns a
    one-line summary (for the test log)."""
    errors = [s.error for s in during if s.error]
    assert not errors, f"well-behaved client failed during {what}: {errors[:5]}"
    assert len(during) >= MIN_PROBES_DURING, (
        f"only {len(during)} probes ran during {what}: {during}"
    )
    summary = []
    for name in ("get_s", "stream_s"):
        base = p50([getattr(s, name) for s in baseline])
        values = [getattr(s, name) for s in during]
        bound = max(LATENCY_FACTOR * base, LATENCY_FLOOR_S)
        assert p50(values) <= bound, (
            f"{name} p50 {p50(values) * 1e3:.1f} ms during {what} > {bound * 1e3:.1f} ms "
            f"(baseline p50 {base * 1e3:.2f} ms)"
        )
        assert max(values) <= MAX_CALL_S, f"{name} max {max(values):.3f} s during {what}"
        summary.append(
            f"{name} p50 {base * 1e3:.2f}->{p50(values) * 1e3:.2f} ms max {max(values) * 1e3:.1f}"
        )
    return f"{what}: {len(during)} probes, " + ", ".join(summary)


# --------------------------------------------------------------------------------------------
# Raw TLS / HTTP/2
# --------------------------------------------------------------------------------------------


def client_ssl_context(test_pki: TestPKI, stem: str = "admin-client") -> ssl.SSLContext:
    """TLS 1.3, our CA, a client certificate, ALPN h2: what a gRPC client sends."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(test_pki.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(test_pki.cert(stem), test_pki.key(stem))
    context.set_alpn_protocols(["h2"])
    context.check_hostname = False  # the server certificate names localhost; we dial 127.0.0.1
    return context


def client_hello(test_pki: TestPKI) -> bytes:
    """The bytes of a real TLS ClientHello (to send half of it and stall)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ssl_context(test_pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def grpc_frame(message: bytes, *, declared: int | None = None, compressed: int = 0) -> bytes:
    """A gRPC length-prefixed message (``declared`` overrides the length in the prefix)."""
    length = len(message) if declared is None else declared
    return struct.pack(">BI", compressed, length) + message


def request_headers(method: str, *, timeout: str | None = None) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", f"/{SERVICE}/{method}"),
        (":authority", "localhost"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


def set_rst_on_close(sock: socket.socket) -> None:
    """Make close() send a TCP RST instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class StreamState:
    """What a raw client has seen on one of its streams."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False

    @property
    def grpc_status(self) -> int | None:
        raw = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return int(raw) if raw is not None else None

    def messages(self) -> list[bytes]:
        """The complete gRPC messages received so far."""
        out, view = [], bytes(self.data)
        while len(view) >= 5:
            _, length = struct.unpack(">BI", view[:5])
            if len(view) < 5 + length:
                break
            out.append(view[5 : 5 + length])
            view = view[5 + length :]
        return out


class RawH2:
    """One TLS connection speaking HTTP/2 by hand (h2, client side), for misbehaving.

    ``auto_ack=False`` never returns flow-control credit, so the server can only send what
    the initial windows allow. Close with ``aclose()`` (FIN) or ``abort()`` (TCP RST).
    """

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], *, auto_ack: bool) -> None:
        self.stream = stream
        self.auto_ack = auto_ack
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, StreamState] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.pings_acked: list[bytes] = []
        self.pings_received = 0  # PINGs from the server (h2 acknowledges them as it reads)
        self.remote_settings: dict[int, int] = {}
        self.closed = False  # the server closed the TCP connection (EOF or reset)
        self.received_bytes = 0
        self._gone = False  # we closed it

    @classmethod
    async def connect(
        cls,
        address: str,
        context: ssl.SSLContext,
        *,
        window: int | None = None,
        auto_ack: bool = True,
        timeout: float = 5.0,
    ) -> RawH2:
        """TLS handshake, HTTP/2 preface and SETTINGS (``window``: our initial stream window)."""
        host, _, port = address.rpartition(":")
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host.strip("[]"), int(port))
            tls = trio.SSLStream(tcp, context, server_hostname="localhost")
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
        self = cls(tls, auto_ack=auto_ack)
        settings = {}
        if window is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = window
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        await self.flush()
        return self

    def ignore_stream_limit(self) -> None:
        """Let h2 open streams beyond the server's MAX_CONCURRENT_STREAMS (an attacker would)."""
        self.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        self.conn.remote_settings.acknowledge()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def start_request(
        self, method: str, message: bytes | None, *, end_stream: bool = True, **kw: Any
    ) -> int:
        """Queue HEADERS (+ DATA) for ``method``; return the stream id (call flush())."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, request_headers(method, **kw), end_stream=False)
        self.streams[stream_id] = StreamState()
        if message is not None:
            self.send_data(stream_id, message, end_stream=end_stream)
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        self.conn.send_data(stream_id, data, end_stream=end_stream)

    async def request(self, method: str, message: bytes, **kw: Any) -> int:
        stream_id = self.start_request(method, message, **kw)
        await self.flush()
        return stream_id

    async def receive_some(self, max_bytes: int = 65536) -> list[Any]:
        """Read once from the socket and process it; [] and ``closed`` set at EOF/reset."""
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            return []
        self.received_bytes += len(data)
        events = self.conn.receive_data(data)
        for event in events:
            self._apply(event)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.flush()
        return list(events)

    def _apply(self, event: Any) -> None:
        state = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and state is not None:
            state.headers.update(dict(event.headers))
        elif isinstance(event, h2.events.TrailersReceived) and state is not None:
            state.trailers.update(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived) and state is not None:
            state.data += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and state is not None:
            state.ended = True
        elif isinstance(event, h2.events.StreamReset) and state is not None:
            state.reset = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked.append(bytes(event.ping_data))
        elif isinstance(event, h2.events.PingReceived):
            self.pings_received += 1
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = int(change.new_value)

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Read and process until ``condition()`` holds or the connection closes; fail after
        ``timeout``."""
        with trio.fail_after(timeout):
            while not condition() and not self.closed:
                await self.receive_some()
        assert condition(), "connection closed before the condition held"

    async def until_closed(self, timeout: float) -> None:
        """Read (and discard) until the server closes the connection; fail after ``timeout``."""
        with trio.fail_after(timeout):
            while not self.closed:
                await self.receive_some()

    def finished(self, stream_id: int) -> bool:
        state = self.streams[stream_id]
        return state.ended or state.reset is not None

    async def aclose(self) -> None:
        if not self._gone:
            self._gone = True
            await trio.aclose_forcefully(self.stream)

    async def abort(self) -> None:
        """Close with a TCP RST, no TLS close_notify, no GOAWAY: a vanished client."""
        if not self._gone:
            self._gone = True
            set_rst_on_close(self.stream.transport_stream.socket)  # type: ignore[arg-type]
            await trio.aclose_forcefully(self.stream.transport_stream)


async def open_tcp(address: str) -> trio.SocketStream:
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host.strip("[]"), int(port))


async def wait_closed_by_peer(stream: trio.abc.ReceiveStream, timeout: float) -> float:
    """Seconds until the peer closes (EOF or reset); fail after ``timeout``."""
    t0 = time.monotonic()
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                break
            if not data:
                break
    return time.monotonic() - t0


def log_lines_since(srv: ServerProc, offset: int) -> list[str]:
    """The server log lines written after byte ``offset`` of its log."""
    return srv.log_text()[offset:].splitlines()


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking (grpcio) call in a worker thread so Trio tasks keep running."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def stream_request(job_id: str) -> bytes:
    """A framed GetJobsStreamReq, ready to send on a raw HTTP/2 stream."""
    return grpc_frame(worker_pb2.GetJobsStreamReq(id=job_id).SerializeToString())


def get_job_request(job_id: str) -> bytes:
    return grpc_frame(worker_pb2.GetJobReq(id=job_id).SerializeToString())


def stop_job(stub: worker_pb2_grpc.JobServiceStub, job_id: str) -> None:
    """Stop a job that may already have ended (cleanup at the end of a test)."""
    with contextlib.suppress(grpc.RpcError):
        stub.StopJob(worker_pb2.StopJobReq(id=job_id), timeout=10)
