"""What both ends of the wire agree on, defined once: the service, its default port and the
largest message either side accepts unless configured otherwise."""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PORT",
    "EXIT_CODE_TRAILER",
    "OFFSET_HEADER",
    "SERVICE_NAME",
    "STATUS_TRAILER",
]

SERVICE_NAME = "job_worker.JobService"  # package.service in protos/worker.proto
DEFAULT_PORT = 50051  # the spec's "<host>:50051"
# grpc's default receive limit: every grpc client already fits its messages in it.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# GetJobsStream's metadata (README "Output"). In the response headers: the offset of the
# stream's first byte (a negative request offset resolved). In the OK trailers: the job's
# status when the stream ended and its exit code as on the wire (-1 unknown).
OFFSET_HEADER = "jobworker-offset"
STATUS_TRAILER = "jobworker-status"
EXIT_CODE_TRAILER = "jobworker-exit-code"
