#!/usr/bin/env python3
"""A reference gRPC server for the benchmarks: grpc.aio (C core) serving the same proto.

  python scripts/bench_reference.py --certs-dir D [--listen 127.0.0.1:0] [--list-size N]

Same transport settings as jobworker's server: mutual TLS against ca-cert.pem with
server-cert.pem/server-key.pem, ALPN h2 (grpc core always negotiates h2), TLS 1.3 (grpc core
negotiates 1.3 with a grpcio client; its Python API has no knob to forbid 1.2).

It does no job work at all; it is the yardstick for the transport and serialisation cost:

- GetJob(id): a fixed GetJobRes echoing the id (the unary reference).
- GetJobs(): a prebuilt Jobs message with --list-size finished jobs (the listing reference).
- GetJobsStream(id="bytes:N"): N bytes of zeros from one prebuilt 64 KiB DataChunk in memory,
  the same chunk size as jobworker's stream (the streaming reference).

Prints exactly one line ``listening on HOST:PORT`` to stderr once serving; SIGTERM/SIGINT stop it
(in-flight calls get a 1 s grace).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobworker.api import worker_pb2, worker_pb2_grpc

CHUNK_BYTES = 64 * 1024  # jobworker's DataChunk payloads are at most 64 KiB: same framing
STREAM_PREFIX = "bytes:"
SHUTDOWN_GRACE_S = 1.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 10,000-job listing must fit, as on our server
START_TIME = "2026-01-01T00:00:00Z"


def _job(job_id: str) -> dict[str, object]:
    return {
        "id": job_id,
        "command": "/bin/true",
        "maxCPU": 100,
        "maxMemory": 512,
        "status": "COMPLETED",
        "startTime": START_TIME,
        "endTime": START_TIME,
    }


class ReferenceServicer(worker_pb2_grpc.JobServiceServicer):
    """GetJob, GetJobs and GetJobsStream from memory; the other methods stay UNIMPLEMENTED."""

    def __init__(self, list_size: int) -> None:
        self._chunk = worker_pb2.DataChunk(payload=bytes(CHUNK_BYTES))
        self._jobs = worker_pb2.Jobs(
            jobs=[worker_pb2.Job(**_job(str(i))) for i in range(1, list_size + 1)]  # type: ignore[arg-type]
        )

    async def GetJob(
        self, request: worker_pb2.GetJobReq, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetJobRes:
        return worker_pb2.GetJobRes(**_job(request.id))  # type: ignore[arg-type]

    async def GetJobs(
        self, request: worker_pb2.EmptyRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.Jobs:
        return self._jobs

    async def GetJobsStream(
        self, request: worker_pb2.GetJobsStreamReq, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DataChunk]:
        if not request.id.startswith(STREAM_PREFIX):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job not found: {request.id}")
        remaining = int(request.id.removeprefix(STREAM_PREFIX))
        while remaining >= CHUNK_BYTES:
            yield self._chunk
            remaining -= CHUNK_BYTES
        if remaining:
            yield worker_pb2.DataChunk(payload=bytes(remaining))


async def serve(listen: str, certs_dir: Path, list_size: int) -> None:
    """Serve until SIGTERM/SIGINT; then stop with a short grace for in-flight calls."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    worker_pb2_grpc.add_JobServiceServicer_to_server(ReferenceServicer(list_size), server)
    credentials = grpc.ssl_server_credentials(
        [
            (
                (certs_dir / "server-key.pem").read_bytes(),
                (certs_dir / "server-cert.pem").read_bytes(),
            )
        ],
        root_certificates=(certs_dir / "ca-cert.pem").read_bytes(),
        require_client_auth=True,
    )
    host, _, port = listen.rpartition(":")
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    await server.start()
    print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(SHUTDOWN_GRACE_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--certs-dir", type=Path, required=True)
    parser.add_argument("--list-size", type=int, default=10_000, help="jobs in GetJobs' answer")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.certs_dir, args.list_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
