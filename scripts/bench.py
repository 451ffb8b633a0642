#!/usr/bin/env python3
"""jobworker benchmarks: the real server (TLS, real jobs) against physical floors and a grpc.aio
reference server, measured side by side in one run, printed as a table of ratios.

  python scripts/bench.py                     # everything (under 10 minutes on 2 cores)
  python scripts/bench.py --quick             # smoke run: small sizes, few repetitions (~1 min)
  python scripts/bench.py --only stream,fanout --json results.json

Figures (issue 8): start, firstbyte, unary, stream, fanout, scale, list, stop.
The bench never asserts a threshold; it prints what it measured. See docs/benchmarks.md.

Processes: the harness (this file) spawns the jobworker server and the reference server
(scripts/bench_reference.py) as subprocesses, makes sequential latency calls itself with grpcio,
and runs throughput clients (grpcio / grpc.aio) in separate processes (this file with the hidden
``_client`` sub-command) so that no client shares a GIL with the harness or a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from jobworker import pki  # noqa: E402
from jobworker.api import worker_pb2 as pb  # noqa: E402
from jobworker.api import worker_pb2_grpc  # noqa: E402

FIGURES = ("start", "firstbyte", "unary", "stream", "fanout", "scale", "list", "stop", "go")
LISTENING_RE = re.compile(r"listening on (\S+)")
STARTUP_TIMEOUT_S = 60.0  # loading 10,000 records takes a while on a cold cache
SHUTDOWN_TIMEOUT_S = 60.0  # a server stopping 500 jobs at shutdown
CLIENT_TIMEOUT_S = 300.0  # a client process that has not answered by then is stuck
RPC_TIMEOUT_S = 30.0
RSS_SAMPLE_S = 0.01  # RSS poll period while a figure runs: peaks last longer than 10 ms
MB = 1e6  # throughput in MB/s = 10^6 bytes per second, as in notes/purerpc.md
MIB = 1 << 20
GIB = 1 << 30
MAX_MESSAGE_BYTES = 64 * MIB  # a 10,000-job listing is ~1 MB; grpcio's default cap is 4 MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S = 0.1  # the server's default --stop-grace: the API promises SIGKILL after 100 ms


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes and repetition counts; --quick shrinks every one of them."""

    reps: int  # repetitions of each throughput figure (the figure is their median)
    start_calls: int
    firstbyte_calls: int
    unary_seconds: float
    unary_warmup_s: float
    stream_bytes: int
    fanout_bytes: dict[int, int]  # readers -> bytes the job writes
    scale_jobs: int
    scale_cpu_window_s: float
    list_records: int
    list_calls: int
    stop_calls: int


FULL = Scale(
    reps=3,
    start_calls=300,
    firstbyte_calls=30,
    unary_seconds=2.0,
    unary_warmup_s=0.5,
    stream_bytes=GIB,
    # 100 readers x 1 GiB would be 100 GiB through loopback TLS: minutes on 2 cores. The job
    # shrinks as readers grow so each run delivers 0.5-1.6 GiB in total.
    fanout_bytes={1: 512 * MIB, 10: 64 * MIB, 100: 16 * MIB},
    scale_jobs=500,
    scale_cpu_window_s=5.0,
    list_records=10_000,
    list_calls=30,
    stop_calls=10,
)
QUICK = Scale(
    reps=1,
    start_calls=30,
    firstbyte_calls=5,
    unary_seconds=0.5,
    unary_warmup_s=0.2,
    stream_bytes=64 * MIB,
    fanout_bytes={1: 16 * MIB, 10: 4 * MIB, 100: 1 * MIB},
    scale_jobs=50,
    scale_cpu_window_s=1.0,
    list_records=500,
    list_calls=5,
    stop_calls=3,
)


# ----------------------------------------------------------------------------- statistics


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def ratio(ours: float, reference: float) -> str:
    if not reference or reference != reference or ours != ours:
        return "n/a"
    return f"{ours / reference:.2f}x"


@dataclasses.dataclass
class Row:
    """One line of the result table."""

    figure: str
    metric: str
    ours: str
    reference: str
    ratio: str
    note: str = ""


@dataclasses.dataclass
class Results:
    rows: list[Row] = dataclasses.field(default_factory=list)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, *args: str) -> None:
        row = Row(*args)
        self.rows.append(row)
        print(f"  {row.metric}: {row.ours} | ref {row.reference} | {row.ratio}", flush=True)


# ----------------------------------------------------------------------------- processes


def proc_rss_bytes(pid: int) -> int:
    """VmRSS of pid from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_private_bytes(pid: int) -> int:
    """Private_Clean + Private_Dirty of pid (smaps_rollup): memory no other process shares."""
    total = 0
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def descendants_of(root: int) -> list[int]:
    """Every live descendant of ``root`` (the launcher, the jobs' inits and commands)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += frontier
    return found


def supervision_private_bytes(server_pid: int, command: str) -> int:
    """Private memory of the server and of every process it runs but the jobs' own
    ``command`` processes: what supervising the jobs costs (server, launcher, job inits)."""
    total = proc_private_bytes(server_pid)
    for pid in descendants_of(server_pid):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm != command:
            total += proc_private_bytes(pid)
    return total


def supervision_cpu_s(server_pid: int, command: str) -> float:
    """CPU seconds of the server and of its helpers (launcher, job inits), not of ``command``."""
    total = proc_cpu_seconds(server_pid)
    for pid in descendants_of(server_pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != command:
                total += proc_cpu_seconds(pid)
        except OSError:
            continue
    return total


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of pid (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


class RssPeak:
    """Samples a process's VmRSS in a thread while the block runs; ``peak`` is the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = proc_rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, proc_rss_bytes(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, proc_rss_bytes(self.pid))

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / MB


class Server:
    """A server subprocess that prints ``listening on HOST:PORT`` to stderr once serving."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        started = time.monotonic()
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        self.address = self._wait_listening()
        self.startup_s = time.monotonic() - started

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            text = self.log_path.read_text(errors="replace")
            if match := LISTENING_RE.search(text):
                return match.group(1)
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"{self.name} did not start:\n{text[-3000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        return proc_rss_bytes(self.pid) / MB

    def cpu_s(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> float:
        """SIGTERM and wait; returns the seconds it took to exit (kills it after a timeout)."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"  ! {self.name} ignored SIGTERM for {SHUTDOWN_TIMEOUT_S}s: killed", flush=True)
            self.process.kill()
            self.process.wait()
        self._log.close()
        return time.monotonic() - started


@dataclasses.dataclass
class Env:
    """Everything a figure needs: scale, scratch space, certificates, the reference server."""

    scale: Scale
    tmp: Path
    certs: Path
    reference: Server
    server_args: list[str]
    results: Results
    floors: dict[str, float] = dataclasses.field(default_factory=dict)
    _servers: int = 0

    @contextlib.contextmanager
    def jobworker(
        self, data_dir: Path | None = None, extra_args: tuple[str, ...] = ()
    ) -> Iterator[Server]:
        """A fresh jobworker server (own data dir, removed afterwards unless given)."""
        self._servers += 1
        own = data_dir is None
        data = data_dir or self.tmp / f"data-{self._servers}"
        argv = [
            sys.executable,
            "-m",
            "jobworker.server",
            "--listen",
            "127.0.0.1:0",
            "--certs-dir",
            str(self.certs),
            "--data-dir",
            str(data),
            *self.server_args,
            *extra_args,
        ]
        server = Server("jobworker", argv, self.tmp / f"server-{self._servers}.log")
        try:
            yield server
        finally:
            server.stop()
            if own:
                shutil.rmtree(data, ignore_errors=True)

    def credentials(self) -> grpc.ChannelCredentials:
        return client_credentials(self.certs)

    @contextlib.contextmanager
    def stub(self, server: Server) -> Iterator[worker_pb2_grpc.JobServiceStub]:
        with grpc.secure_channel(
            server.address, self.credentials(), options=channel_options()
        ) as channel:
            grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
            yield worker_pb2_grpc.JobServiceStub(channel)


def channel_options(own_connection: bool = False) -> list[tuple[str, int]]:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if own_connection:  # grpcio shares one connection between identical channels otherwise
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def client_credentials(certs: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca-cert.pem").read_bytes(),
        private_key=(certs / "admin-client-key.pem").read_bytes(),
        certificate_chain=(certs / "admin-client-cert.pem").read_bytes(),
    )


class ClientProc:
    """A ``bench.py _client`` subprocess: prints ``ready``, reads one target line on stdin,
    prints ``measuring`` when its window opens and one JSON line with its results."""

    def __init__(self, env: Env, address: str, role: str, *args: str) -> None:
        argv = [
            sys.executable,
            __file__,
            "_client",
            role,
            "--target",
            address,
            "--certs",
            str(env.certs),
            *args,
        ]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.expect("ready")

    def expect(self, word: str) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != word:
            self.process.kill()
            raise RuntimeError(f"client said {line!r}, expected {word!r}")

    def kill(self) -> None:
        """Make sure the process is gone (a figure that failed halfway leaves it waiting)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def go(self, target: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(target + "\n")
        self.process.stdin.flush()

    def result(self) -> Any:
        assert self.process.stdout is not None
        assert self.process.stdin is not None
        self.process.stdin.close()
        out = self.process.stdout.read()  # not communicate(): it skips what readline buffered
        self.process.wait(CLIENT_TIMEOUT_S)
        lines = [line for line in out.splitlines() if line.strip()]
        if self.process.returncode != 0 or not lines:
            raise RuntimeError(f"client failed ({self.process.returncode}): {lines[-1:]}")
        return json.loads(lines[-1])


# ----------------------------------------------------------------------------- floors


def spawn_floor(calls: int) -> list[float]:
    """Spawning /bin/true from Python (subprocess.run: fork/exec + wait), per call."""
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        latencies.append(time.perf_counter() - started)
    return latencies


def echo_first_byte_floor(calls: int) -> list[float]:
    """Spawning ``echo hi`` with a stdout pipe and reading its first byte."""
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        with subprocess.Popen(["echo", "hi"], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            proc.stdout.read(1)
            latencies.append(time.perf_counter() - started)
            proc.stdout.read()
    return latencies


def pipe_floor(nbytes: int, sink: str) -> float:
    """MB/s of ``head -c N /dev/zero | cat > sink``: the kernel pipe, no gRPC, no TLS."""
    started = time.perf_counter()
    subprocess.run(f"head -c {nbytes} /dev/zero | cat > {sink}", shell=True, check=True)
    return nbytes / (time.perf_counter() - started) / MB


def rpc_latencies(call: Callable[[], object], calls: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return latencies


# ----------------------------------------------------------------------------- figures


def rpc_floor(env: Env, stub: worker_pb2_grpc.JobServiceStub) -> float:
    """The median unary round trip on our server (from figure 1, or measured now)."""
    if "rpc" not in env.floors:
        job = stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S)
        env.floors["rpc"] = median(rpc_latencies(lambda: stub.GetJob(pb.GetJobReq(id=job.id)), 100))
    return env.floors["rpc"]


# CreateJob measured again with less to set up per job: what isolation and cgroups cost.
START_VARIANTS = (
    ("--isolation none", ("--isolation", "none")),
    ("--isolation none --cgroups off", ("--isolation", "none", "--cgroups", "off")),
)


def fig_start(env: Env) -> None:
    """1. CreateJob /bin/true vs the spawn floor and the RPC floor (GetJob on our server)."""
    n = env.scale.start_calls
    results = env.results
    spawn = spawn_floor(n)
    with env.jobworker() as server, env.stub(server) as stub:
        first = stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S)
        rpc = rpc_latencies(lambda: stub.GetJob(pb.GetJobReq(id=first.id)), n)
        create = rpc_latencies(
            lambda: stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S),
            n,
            warmup=5,
        )
    with env.stub(env.reference) as ref_stub:
        ref_rpc = rpc_latencies(lambda: ref_stub.GetJob(pb.GetJobReq(id="1")), n)
    env.floors.update(spawn=median(spawn), rpc=median(rpc), ref_rpc=median(ref_rpc))
    results.raw["start"] = {
        "spawn": spawn,
        "rpc": rpc,
        "create": create,
        "ref_rpc": ref_rpc,
    }
    overhead = median(create) - median(rpc)
    results.add(
        "1 start",
        f"CreateJob /bin/true, {n} sequential",
        f"{ms(median(create))} (p99 {ms(p99(create))})",
        f"spawn+RPC floor {ms(median(spawn) + median(rpc))}",
        ratio(median(create), median(spawn) + median(rpc)),
        f"excess over floors {ms(median(create) - median(spawn) - median(rpc))}",
    )
    for label, flags in START_VARIANTS:
        with env.jobworker(extra_args=flags) as server, env.stub(server) as stub:
            variant = rpc_latencies(
                lambda: stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S),
                n,
                warmup=5,
            )
        results.raw["start"][label] = variant
        results.add(
            "1 start",
            f"CreateJob /bin/true, {label}",
            f"{ms(median(variant))} (p99 {ms(p99(variant))})",
            f"spawn+RPC floor {ms(median(spawn) + median(rpc))}",
            ratio(median(variant), median(spawn) + median(rpc)),
            f"excess over floors {ms(median(variant) - median(spawn) - median(rpc))}",
        )
    results.add(
        "1 start",
        "create minus RPC floor vs spawn floor",
        ms(overhead),
        f"subprocess.run /bin/true {ms(median(spawn))} (p99 {ms(p99(spawn))})",
        ratio(overhead, median(spawn)),
    )
    results.add(
        "1 start",
        "RPC floor: unary GetJob, sequential",
        f"{ms(median(rpc))} (p99 {ms(p99(rpc))})",
        f"grpc.aio {ms(median(ref_rpc))} (p99 {ms(p99(ref_rpc))})",
        ratio(median(rpc), median(ref_rpc)),
        "latency: lower is better",
    )


def fig_firstbyte(env: Env) -> None:
    """2. CreateJob(echo hi) sent -> first output byte on a stream opened right after."""
    n = env.scale.firstbyte_calls
    floor = echo_first_byte_floor(n)
    latencies = []
    with env.jobworker() as server, env.stub(server) as stub:
        rpc = rpc_floor(env, stub)
        for _ in range(n + 2):
            started = time.perf_counter()
            job = stub.CreateJob(
                pb.CreateJobReq(command="echo", args=["hi"]), timeout=RPC_TIMEOUT_S
            )
            stream = stub.GetJobsStream(pb.GetJobsStreamReq(id=job.id), timeout=RPC_TIMEOUT_S)
            chunk = next(stream)
            latencies.append(time.perf_counter() - started)
            assert chunk.payload, "empty first chunk"
            stream.cancel()
    latencies = latencies[2:]  # the first calls warm the connection and the server's paths
    reference = median(floor) + 2 * rpc
    env.results.raw["firstbyte"] = {"ours": latencies, "echo_floor": floor}
    env.results.add(
        "2 first byte",
        f"CreateJob sent -> first byte of `echo hi`, {n} runs",
        f"{ms(median(latencies))} (p99 {ms(p99(latencies))})",
        f"echo via pipe {ms(median(floor))} + 2 RPC floors = {ms(reference)}",
        ratio(median(latencies), reference),
    )


def unary_run(env: Env, address: str, target: str, concurrency: int, pid: int) -> dict[str, Any]:
    """One timed window of GetJob calls from a client process; adds the server's CPU use."""
    client = ClientProc(
        env,
        address,
        "unary",
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(env.scale.unary_seconds),
        "--warmup",
        str(env.scale.unary_warmup_s),
    )
    try:
        client.go(target)
        client.expect("measuring")
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        client.expect("done")
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        result: dict[str, Any] = client.result()
    finally:
        client.kill()
    result["server_cpu"] = (cpu1 - cpu0) / (t1 - t0)
    return result


def fig_unary(env: Env) -> None:
    """3. GetJob calls/s with 1 and 32 concurrent callers vs the grpc.aio reference."""
    with env.jobworker() as server, env.stub(server) as stub:
        job = stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S)
        for concurrency in (1, 32):
            ours, ref = [], []
            for _ in range(env.scale.reps):  # interleaved: drift hits both sides alike
                ours.append(unary_run(env, server.address, job.id, concurrency, server.pid))
                ref.append(
                    unary_run(env, env.reference.address, "1", concurrency, env.reference.pid)
                )
            env.results.raw[f"unary_{concurrency}"] = {"ours": ours, "ref": ref}
            rate = median([r["calls"] / r["seconds"] for r in ours])
            ref_rate = median([r["calls"] / r["seconds"] for r in ref])
            lat = median([r["p50"] for r in ours])
            ref_lat = median([r["p50"] for r in ref])
            env.results.add(
                "3 unary",
                f"GetJob calls/s, {concurrency} caller{'s' if concurrency > 1 else ''}",
                f"{rate:,.0f}/s (p50 {ms(lat)}, p99 {ms(median([r['p99'] for r in ours]))})",
                f"grpc.aio {ref_rate:,.0f}/s (p50 {ms(ref_lat)}, "
                f"p99 {ms(median([r['p99'] for r in ref]))})",
                ratio(rate, ref_rate),
                f"server CPU {median([r['server_cpu'] for r in ours]):.0%} vs "
                f"{median([r['server_cpu'] for r in ref]):.0%} of a core",
            )


def stream_run(
    env: Env,
    server: Server,
    readers: int,
    nbytes: int,
    create: Callable[[], str] | None,
) -> dict[str, Any]:
    """``readers`` concurrent streams of one job (or of the reference's memory buffer), spread
    over up to two client processes; returns aggregate MB/s and the server's RSS growth."""
    procs = 1 if readers == 1 else 2
    split = [readers // procs + (1 if i < readers % procs else 0) for i in range(procs)]
    clients = [
        ClientProc(env, server.address, "stream", "--readers", str(count)) for count in split
    ]
    try:
        with RssPeak(server.pid) as rss:
            cpu0 = server.cpu_s()
            target = create() if create is not None else f"bytes:{nbytes}"
            for client in clients:
                client.go(target)
            per_reader = [r for client in clients for r in client.result()]
            cpu1 = server.cpu_s()
    finally:
        for client in clients:
            client.kill()
    errors = [r["error"] for r in per_reader if r.get("error")]
    received = sum(r["bytes"] for r in per_reader)
    opened = min(r["t_open"] for r in per_reader)
    ended = max(r["t_end"] for r in per_reader)
    short = sum(1 for r in per_reader if r["bytes"] != nbytes)
    return {
        "mbps": received / (ended - opened) / MB,
        "rss_growth_mb": rss.growth_mb,
        "rss_baseline_mb": rss.baseline / MB,
        "server_cpu": (cpu1 - cpu0) / (ended - opened),
        "server_cpu_s_per_gb": (cpu1 - cpu0) / (received / 1e9) if received else float("nan"),
        "short_readers": short,
        "errors": errors[:3],
        "seconds": ended - opened,
    }


def create_writer(stub: worker_pb2_grpc.JobServiceStub, nbytes: int) -> Callable[[], str]:
    def create() -> str:
        job = stub.CreateJob(
            pb.CreateJobReq(command="head", args=["-c", str(nbytes), "/dev/zero"]),
            timeout=RPC_TIMEOUT_S,
        )
        return str(job.id)

    return create


def cpu_per_gb(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> str:
    """Server CPU seconds per GB delivered: the cost per byte, which other load on the machine
    disturbs much less than MB/s."""
    mine = median([r["server_cpu_s_per_gb"] for r in ours])
    theirs = median([r["server_cpu_s_per_gb"] for r in ref])
    return f"CPU {mine:.2f} s/GB vs {theirs:.2f} ({ratio(mine, theirs)})"


def _check(run: dict[str, Any], label: str) -> str:
    if run["short_readers"] or run["errors"]:
        print(f"  ! {label}: {run['short_readers']} short readers, {run['errors']}", flush=True)
        return f"; {run['short_readers']} readers got the wrong byte count!"
    return ""


def fig_stream(env: Env) -> None:
    """4. One job writing N bytes, one grpcio reader: MB/s vs a plain pipe and grpc.aio."""
    nbytes = env.scale.stream_bytes
    ours, ref, pipe, pipe_file = [], [], [], []
    with env.jobworker() as server, env.stub(server) as stub:
        for _ in range(env.scale.reps):
            ours.append(stream_run(env, server, 1, nbytes, create_writer(stub, nbytes)))
            ref.append(stream_run(env, env.reference, 1, nbytes, None))
            pipe.append(pipe_floor(nbytes, "/dev/null"))
            sink = env.tmp / "pipe-floor.out"
            pipe_file.append(pipe_floor(nbytes, str(sink)))
            sink.unlink()
    env.results.raw["stream"] = {"ours": ours, "ref": ref, "pipe": pipe, "pipe_file": pipe_file}
    mbps = median([r["mbps"] for r in ours])
    label = f"{nbytes / MIB:,.0f} MiB"
    note = (
        f"server CPU {median([r['server_cpu'] for r in ours]):.0%} of a core vs "
        f"{median([r['server_cpu'] for r in ref]):.0%}; {cpu_per_gb(ours, ref)}; "
        f"RSS growth {median([r['rss_growth_mb'] for r in ours]):.1f} MB"
    )
    env.results.add(
        "4 stream",
        f"{label} job -> 1 grpcio reader, MB/s",
        f"{mbps:,.0f} MB/s",
        f"grpc.aio memory buffer {median([r['mbps'] for r in ref]):,.0f} MB/s",
        ratio(mbps, median([r["mbps"] for r in ref])),
        note + _check(ours[0], "stream"),
    )
    env.results.add(
        "4 stream",
        f"{label} job -> 1 grpcio reader vs the pipe",
        f"{mbps:,.0f} MB/s",
        f"head | cat >/dev/null {median(pipe):,.0f} MB/s; "
        f"head | cat >file {median(pipe_file):,.0f} MB/s",
        ratio(mbps, median(pipe)),
        "ratio to the pipe into /dev/null (the physical floor)",
    )


def fig_fanout(env: Env) -> None:
    """5. The same job with 1, 10, 100 concurrent readers: aggregate MB/s, server RSS growth."""
    for readers, nbytes in env.scale.fanout_bytes.items():
        ours, ref = [], []
        with env.jobworker() as server, env.stub(server) as stub:
            for _ in range(env.scale.reps):
                ours.append(stream_run(env, server, readers, nbytes, create_writer(stub, nbytes)))
                ref.append(stream_run(env, env.reference, readers, nbytes, None))
        env.results.raw[f"fanout_{readers}"] = {"ours": ours, "ref": ref}
        mbps = median([r["mbps"] for r in ours])
        ref_mbps = median([r["mbps"] for r in ref])
        growth = median([r["rss_growth_mb"] for r in ours])
        ref_growth = median([r["rss_growth_mb"] for r in ref])
        env.results.add(
            "5 fan-out",
            f"{readers} reader{'s' if readers > 1 else ''} x {nbytes / MIB:,.0f} MiB job, "
            "aggregate MB/s",
            f"{mbps:,.0f} MB/s",
            f"grpc.aio memory buffer {ref_mbps:,.0f} MB/s",
            ratio(mbps, ref_mbps),
            f"server CPU {median([r['server_cpu'] for r in ours]):.0%} of a core; "
            + cpu_per_gb(ours, ref)
            + _check(ours[0], "fanout"),
        )
        env.results.add(
            "5 fan-out",
            f"{readers} reader{'s' if readers > 1 else ''}: server RSS growth (peak - before)",
            f"{growth:.1f} MB (max {max(r['rss_growth_mb'] for r in ours):.1f})",
            f"grpc.aio {ref_growth:.1f} MB",
            # a ratio to a growth under 1 MB (page-size noise) would mean nothing
            ratio(growth, ref_growth) if ref_growth >= 1 else "n/a",
            f"baseline RSS {median([r['rss_baseline_mb'] for r in ours]):.1f} MB; target < 100 MB",
        )


def fig_scale(env: Env) -> None:
    """6. N concurrent `sleep 30` jobs: create time, RSS per job, CPU while they sleep."""
    n = env.scale.scale_jobs
    window = env.scale.scale_cpu_window_s
    spawn = env.floors.get("spawn") or median(spawn_floor(50))
    with env.jobworker() as server, env.stub(server) as stub:
        rpc = rpc_floor(env, stub)
        cpu0 = server.cpu_s()
        time.sleep(window)  # the idle window IS the measurement (CPU over wall time)
        idle_cpu = (server.cpu_s() - cpu0) / window
        rss0 = server.rss_mb()
        private0 = supervision_private_bytes(server.pid, "sleep")
        started = time.perf_counter()
        for _ in range(n):
            stub.CreateJob(pb.CreateJobReq(command="sleep", args=["30"]), timeout=RPC_TIMEOUT_S)
        create_s = time.perf_counter() - started
        rss1 = server.rss_mb()
        private1 = supervision_private_bytes(server.pid, "sleep")
        cpu0 = supervision_cpu_s(server.pid, "sleep")
        time.sleep(window)
        sleeping_cpu = (supervision_cpu_s(server.pid, "sleep") - cpu0) / window
        running = sum(1 for j in stub.GetJobs(pb.EmptyRequest()).jobs if j.status == "RUNNING")
        list_lat = rpc_latencies(lambda: stub.GetJobs(pb.EmptyRequest()), 20, warmup=2)
        stop_s = server.stop()
    env.results.raw["scale"] = {
        "jobs": n,
        "create_s": create_s,
        "rss_before_mb": rss0,
        "rss_after_mb": rss1,
        "supervision_private_before": private0,
        "supervision_private_after": private1,
        "idle_cpu": idle_cpu,
        "sleeping_cpu": sleeping_cpu,
        "running_at_window_end": running,
        "shutdown_s": stop_s,
    }
    floor = n * (spawn + rpc)
    env.results.add(
        "6 scale",
        f"create {n} `sleep 30` jobs, sequential",
        f"{create_s:.2f} s ({create_s / n * 1e3:.2f} ms/job)",
        f"{n} x (spawn + RPC floor) {floor:.2f} s",
        ratio(create_s, floor),
    )
    env.results.add(
        "6 scale",
        "server RSS per running job",
        f"{(rss1 - rss0) / n * 1e3:.1f} KB ({rss0:.1f} -> {rss1:.1f} MB)",
        "n/a",
        "n/a",
        "absolute figure",
    )
    env.results.add(
        "6 scale",
        "private memory per running job (server, launcher, job init)",
        f"{(private1 - private0) / n / 1024:.1f} KB",
        "target 200 KB",
        ratio((private1 - private0) / n, 200 * 1024),
        f"{private0 / MIB:.1f} -> {private1 / MIB:.1f} MiB in all",
    )
    env.results.add(
        "6 scale",
        f"server CPU (with launcher and inits), {n} jobs sleeping, {window:.0f} s window",
        f"{sleeping_cpu:.2%} of a core",
        f"idle server {idle_cpu:.2%}",
        f"+{(sleeping_cpu - idle_cpu) * 100:.2f} pts",
        f"{running}/{n} still running at the end of the window",
    )
    env.results.add(
        "6 scale",
        f"GetJobs with {n} running jobs",
        f"{ms(median(list_lat))} (p99 {ms(p99(list_lat))})",
        "n/a",
        "n/a",
        f"server shutdown with {n} running jobs: {stop_s:.2f} s",
    )


def clone_records(data_dir: Path, count: int) -> None:
    """Copy job 1's record to ids 2..count (an empty output each): a server with ``count``
    finished jobs on record, without spending minutes running them."""
    jobs = data_dir / "jobs"
    template = json.loads((jobs / "1" / "job.json").read_text())
    for job_id in range(2, count + 1):
        directory = jobs / str(job_id)
        directory.mkdir()
        template["id"] = str(job_id)
        (directory / "job.json").write_text(json.dumps(template))
        (directory / "output.log").touch()


def fig_list(env: Env) -> None:
    """6b. GetJobs latency with N finished jobs on record vs grpc.aio answering N jobs."""
    n = env.scale.list_records
    calls = env.scale.list_calls
    data = env.tmp / "data-list"
    with env.jobworker(data) as server, env.stub(server) as stub:
        job = stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S)
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while stub.GetJob(pb.GetJobReq(id=job.id)).status == "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError("/bin/true did not finish")
            time.sleep(0.01)
    clone_records(data, n)
    with env.jobworker(data) as server, env.stub(server) as stub:
        startup = server.startup_s
        listed = len(stub.GetJobs(pb.EmptyRequest(), timeout=RPC_TIMEOUT_S).jobs)
        ours = rpc_latencies(lambda: stub.GetJobs(pb.EmptyRequest()), calls, warmup=2)
        rss = server.rss_mb()
    shutil.rmtree(data, ignore_errors=True)
    with env.stub(env.reference) as ref_stub:
        ref = rpc_latencies(lambda: ref_stub.GetJobs(pb.EmptyRequest()), calls, warmup=2)
    env.results.raw["list"] = {"ours": ours, "ref": ref, "startup_s": startup, "listed": listed}
    env.results.add(
        "6 scale",
        f"GetJobs with {n:,} finished jobs on record",
        f"{ms(median(ours))} (p99 {ms(p99(ours))})",
        f"grpc.aio prebuilt {n:,} jobs {ms(median(ref))} (p99 {ms(p99(ref))})",
        ratio(median(ours), median(ref)),
        f"listed {listed:,}; server start with them {startup:.2f} s; RSS {rss:.1f} MB",
    )


def fig_stop(env: Env) -> None:
    """7. StopJob latency: a job that exits on SIGTERM, one that ignores it (~grace)."""
    n = env.scale.stop_calls
    term_floor: list[float] = []
    kill_floor: list[float] = []
    for sig, floors in ((signal.SIGTERM, term_floor), (signal.SIGKILL, kill_floor)):
        for _ in range(n):
            proc = subprocess.Popen(["sleep", "30"])
            started = time.perf_counter()
            proc.send_signal(sig)
            proc.wait()
            floors.append(time.perf_counter() - started)
    scripts = {
        "exits on SIGTERM": "echo ready; exec sleep 30",
        "ignores SIGTERM": "trap '' TERM; echo ready; exec sleep 30",
    }
    measured: dict[str, list[float]] = {}
    with env.jobworker() as server, env.stub(server) as stub:
        rpc = rpc_floor(env, stub)
        for label, script in scripts.items():
            measured[label] = []
            for _ in range(n):
                job = stub.CreateJob(
                    pb.CreateJobReq(command="sh", args=["-c", script]), timeout=RPC_TIMEOUT_S
                )
                stream = stub.GetJobsStream(pb.GetJobsStreamReq(id=job.id), timeout=RPC_TIMEOUT_S)
                next(stream)  # the trap is set: the job is really ready for its signal
                started = time.perf_counter()
                stub.StopJob(pb.StopJobReq(id=job.id), timeout=RPC_TIMEOUT_S)
                measured[label].append(time.perf_counter() - started)
                stream.cancel()
    env.results.raw["stop"] = {**measured, "term_floor": term_floor, "kill_floor": kill_floor}
    refs = {
        "exits on SIGTERM": (
            median(term_floor) + rpc,
            f"kill+wait {ms(median(term_floor))} + RPC floor {ms(rpc)}",
        ),
        "ignores SIGTERM": (
            STOP_GRACE_S + median(kill_floor) + rpc,
            f"grace {STOP_GRACE_S * 1e3:.0f} ms + SIGKILL+wait {ms(median(kill_floor))} + RPC",
        ),
    }
    for label, values in measured.items():
        reference, text = refs[label]
        env.results.add(
            "7 stop",
            f"StopJob, job {label}, {n} runs",
            f"{ms(median(values))} (p99 {ms(p99(values))})",
            f"{text} = {ms(reference)}",
            ratio(median(values), reference),
        )


GO_CLIENT_DIR = ROOT / "scripts" / "bench_go"
# Debian's grpc-go and protobuf packages (golang-google-grpc-dev, golang-goprotobuf-dev): the
# client builds offline, in GOPATH mode, against them.
DEBIAN_GOPATH = "/usr/share/gocode"
GO_PACKAGES = ("golang-go", "golang-google-grpc-dev", "golang-goprotobuf-dev", "protobuf-compiler")


def build_go_client(tmp: Path) -> Path | str:
    """The grpc-go bench client, built into ``tmp``; or why it cannot be built here."""
    for tool in ("go", "protoc", "protoc-gen-go"):
        if shutil.which(tool) is None:
            return f"no {tool} (apt install {' '.join(GO_PACKAGES)})"
    src = tmp / "gopath" / "src" / "jwbench"
    (src / "pb").mkdir(parents=True)
    shutil.copy(GO_CLIENT_DIR / "main.go", src / "main.go")
    env = {**os.environ, "GOPATH": f"{tmp / 'gopath'}:{DEBIAN_GOPATH}", "GO111MODULE": "off"}
    env["GOCACHE"] = str(tmp / "gocache")
    steps = [
        ["protoc", "-I", str(ROOT / "protos"),
         f"--go_out=plugins=grpc,paths=source_relative:{src / 'pb'}", "worker.proto"],
        ["go", "build", "-o", str(tmp / "jwbench"), "."],
    ]  # fmt: skip
    for argv in steps:
        done = subprocess.run(argv, check=False, cwd=src, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{argv[0]} failed: {done.stderr.strip()[-300:]}"
    return tmp / "jwbench"


def go_run(client: Path, env: Env, server: Server, *args: str) -> dict[str, Any]:
    """One run of the grpc-go client; adds the server's CPU seconds over it."""
    cpu0 = server.cpu_s()
    done = subprocess.run(
        [str(client), "-addr", server.address, "-certs", str(env.certs), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"grpc-go client: {done.stderr.strip()[-300:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu_s"] = server.cpu_s() - cpu0
    return result


def fig_go(env: Env) -> None:
    """8. The same figures from a grpc-go client: sequential GetJob, one reader of a job."""
    client = build_go_client(env.tmp)
    if isinstance(client, str):
        print(f"  ! grpc-go figures skipped: {client}", flush=True)
        env.results.add("8 grpc-go", "grpc-go client figures", "skipped", "", "n/a", client)
        return
    nbytes = env.scale.stream_bytes
    seconds = str(env.scale.unary_seconds)
    ours_u, ref_u, ours_s, ref_s = [], [], [], []
    with env.jobworker() as server, env.stub(server) as stub:
        job = stub.CreateJob(pb.CreateJobReq(command="/bin/true"), timeout=RPC_TIMEOUT_S)
        for _ in range(env.scale.reps):
            ours_u.append(go_run(client, env, server, "-job", job.id, "-seconds", seconds))
            ref_u.append(go_run(client, env, env.reference, "-job", "1", "-seconds", seconds))
            writer = create_writer(stub, nbytes)()
            ours_s.append(go_run(client, env, server, "-mode", "stream", "-job", writer))
            ref_s.append(
                go_run(client, env, env.reference, "-mode", "stream", "-job", f"bytes:{nbytes}")
            )
    env.results.raw["go"] = {"unary": [ours_u, ref_u], "stream": [ours_s, ref_s]}
    rate, ref_rate = median([r["per_s"] for r in ours_u]), median([r["per_s"] for r in ref_u])
    env.results.add(
        "8 grpc-go",
        "GetJob calls/s, 1 grpc-go caller",
        f"{rate:,.0f}/s (p50 {median([r['p50_ms'] for r in ours_u]):.2f} ms)",
        f"grpc.aio {ref_rate:,.0f}/s (p50 {median([r['p50_ms'] for r in ref_u]):.2f} ms)",
        ratio(rate, ref_rate),
        f"server CPU per call {median([r['server_cpu_s'] / r['calls'] for r in ours_u]) * 1e6:.0f}"
        f" us vs {median([r['server_cpu_s'] / r['calls'] for r in ref_u]) * 1e6:.0f} us",
    )
    mbps, ref_mbps = median([r["mb_per_s"] for r in ours_s]), median([r["mb_per_s"] for r in ref_s])
    short = sum(1 for r in ours_s if r["bytes"] != nbytes)
    env.results.add(
        "8 grpc-go",
        f"{nbytes / MIB:,.0f} MiB job -> 1 grpc-go reader, MB/s",
        f"{mbps:,.0f} MB/s",
        f"grpc.aio memory buffer {ref_mbps:,.0f} MB/s",
        ratio(mbps, ref_mbps),
        f"CPU {median([r['server_cpu_s'] / (r['bytes'] / 1e9) for r in ours_s]):.2f} s/GB vs "
        f"{median([r['server_cpu_s'] / (r['bytes'] / 1e9) for r in ref_s]):.2f}"
        + (f"; {short} runs got the wrong byte count!" if short else ""),
    )


RUNNERS: dict[str, Callable[[Env], None]] = {
    "start": fig_start,
    "firstbyte": fig_firstbyte,
    "unary": fig_unary,
    "stream": fig_stream,
    "fanout": fig_fanout,
    "scale": fig_scale,
    "list": fig_list,
    "stop": fig_stop,
    "go": fig_go,
}


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{name: version(name) for name in ("trio", "purerpc", "grpcio", "protobuf", "h2")},
    }


def markdown(results: Results, info: dict[str, str], elapsed: float, args: str) -> str:
    lines = [
        f"Run: `python scripts/bench.py {args}`, {elapsed:.0f} s, "
        + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "| # | measurement | jobworker | reference | ratio | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.rows:
        cells = [r.figure, r.metric, r.ours, r.reference, r.ratio, r.note]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    scale = QUICK if args.quick else FULL
    if args.reps:
        scale = dataclasses.replace(scale, reps=args.reps)
    only = [name.strip() for name in args.only.split(",")] if args.only else list(FIGURES)
    unknown = [name for name in only if name not in RUNNERS]
    if unknown:
        print(f"unknown figure(s) {unknown}; choose from {','.join(FIGURES)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    info = machine()
    results = Results()
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        certs = tmp / "certs"
        pki.generate_dev_certs(certs)
        reference = Server(
            "reference",
            [
                sys.executable,
                str(ROOT / "scripts" / "bench_reference.py"),
                "--certs-dir",
                str(certs),
                "--list-size",
                str(scale.list_records),
            ],
            tmp / "reference.log",
        )
        env = Env(scale, tmp, certs, reference, args.server_arg or [], results)
        try:
            for name in only:
                print(f"== {name}", flush=True)
                figure_started = time.monotonic()
                try:
                    RUNNERS[name](env)
                except Exception as exc:  # a broken figure must not hide the others
                    text = (
                        f"{exc.code().name}: {exc.details()}"
                        if isinstance(exc, grpc.Call)
                        else str(exc)
                    )
                    last = (text.strip().splitlines() or [""])[-1][-200:].replace("|", "/")
                    print(f"  ! {name} failed: {type(exc).__name__}: {last}", flush=True)
                    results.add(name, "FAILED", type(exc).__name__, "", "", last)
                results.raw.setdefault("seconds", {})[name] = time.monotonic() - figure_started
        finally:
            reference.stop()
            if args.keep_logs:
                for log in tmp.glob("*.log"):
                    shutil.copy(log, Path(args.keep_logs) / log.name)
    elapsed = time.monotonic() - started
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    argv_text = " ".join(sys.argv[1:])
    table = markdown(results, info, elapsed, argv_text)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "elapsed_s": elapsed,
                    "rows": [dataclasses.asdict(r) for r in results.rows],
                    "raw": results.raw,
                },
                indent=1,
            )
        )
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


# ----------------------------------------------------------------------------- client process


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def client_unary(args: argparse.Namespace) -> dict[str, Any]:
    """GetJob(target) in a loop: sync grpcio for one caller, grpc.aio tasks for more."""
    credentials = client_credentials(args.certs)
    if args.concurrency == 1:
        with grpc.secure_channel(args.target, credentials, options=channel_options()) as channel:
            grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
            stub = worker_pb2_grpc.JobServiceStub(channel)
            _say("ready")
            request = pb.GetJobReq(id=sys.stdin.readline().strip())
            deadline = time.monotonic() + args.warmup
            while time.monotonic() < deadline:
                stub.GetJob(request)
            _say("measuring")
            latencies = []
            started = time.monotonic()
            deadline = started + args.seconds
            while (now := time.monotonic()) < deadline:
                stub.GetJob(request)
                latencies.append(time.monotonic() - now)
            seconds = time.monotonic() - started
            _say("done")
        return {"calls": len(latencies), "seconds": seconds, **_lat(latencies)}
    return asyncio.run(_client_unary_aio(args, credentials))


def _lat(latencies: list[float]) -> dict[str, float]:
    return {"p50": median(latencies), "p99": p99(latencies)}


async def _client_unary_aio(
    args: argparse.Namespace, credentials: grpc.ChannelCredentials
) -> dict[str, Any]:
    async with grpc.aio.secure_channel(args.target, credentials, options=channel_options()) as ch:
        await asyncio.wait_for(ch.channel_ready(), RPC_TIMEOUT_S)
        stub = worker_pb2_grpc.JobServiceStub(ch)
        _say("ready")
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        request = pb.GetJobReq(id=line.strip())
        window: dict[str, float] = {}
        latencies: list[float] = []

        async def caller(end: float) -> None:
            while (now := time.monotonic()) < end:
                await stub.GetJob(request)
                if window["start"] <= now and time.monotonic() <= window["end"]:
                    latencies.append(time.monotonic() - now)

        start = time.monotonic() + args.warmup
        window.update(start=start, end=start + args.seconds)

        async def announce() -> None:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            _say("measuring")
            await asyncio.sleep(max(0.0, window["end"] - time.monotonic()))
            _say("done")

        await asyncio.gather(announce(), *(caller(window["end"]) for _ in range(args.concurrency)))
    return {"calls": len(latencies), "seconds": args.seconds, **_lat(latencies)}


async def client_stream(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--readers`` concurrent GetJobsStream calls of one target, each on its own connection."""
    credentials = client_credentials(args.certs)
    channels = [
        grpc.aio.secure_channel(args.target, credentials, options=channel_options(True))
        for _ in range(args.readers)
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(ch.channel_ready() for ch in channels)), RPC_TIMEOUT_S
        )
        _say("ready")
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        request = pb.GetJobsStreamReq(id=line.strip())

        async def read(channel: grpc.aio.Channel) -> dict[str, Any]:
            stub = worker_pb2_grpc.JobServiceStub(channel)
            t_open = time.monotonic()
            t_first = 0.0
            received = 0
            error = ""
            try:
                async for chunk in stub.GetJobsStream(request):
                    if not received:
                        t_first = time.monotonic()
                    received += len(chunk.payload)
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            return {
                "bytes": received,
                "t_open": t_open,
                "t_first": t_first,
                "t_end": time.monotonic(),
                "error": error,
            }

        return list(await asyncio.gather(*(read(ch) for ch in channels)))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py _client")
    parser.add_argument("role", choices=["unary", "stream"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--readers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.role == "unary":
        result: Any = client_unary(args)
    else:
        result = asyncio.run(client_stream(args))
    _say(json.dumps(result))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repetition")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--reps", type=int, help="repetitions per throughput figure (default 3)")
    parser.add_argument("--json", help="write the rows and every raw sample to this file")
    parser.add_argument("--markdown", help="write the result table to this file")
    parser.add_argument("--tmp", help="scratch directory parent (default: the system's)")
    parser.add_argument("--keep-logs", help="copy the servers' logs into this directory")
    parser.add_argument(
        "--server-arg",
        action="append",
        help="extra argument for jobworker.server (repeatable), e.g. --server-arg=--cgroups=off",
    )
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
