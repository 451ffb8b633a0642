"""What both ends of the wire agree on, defined once: the service, its default port and the
largest message either side accepts unless configured otherwise."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_PORT", "SERVICE_NAME"]

SERVICE_NAME = "job_worker.JobService"  # package.service in protos/worker.proto
DEFAULT_PORT = 50051  # the spec's "<host>:50051"
# grpc's default receive limit: every grpc client already fits its messages in it.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
