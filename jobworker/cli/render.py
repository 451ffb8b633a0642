"""How results look: the spec's text blocks, or JSON with the proto field names."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from jobworker.api import worker_pb2

# Statuses after which a job never changes again (LOST: the worker restarted under it).
ENDED_STATUSES = frozenset({"COMPLETED", "FAILED", "STOPPED", "LOST"})


def command_line(command: str, args: Sequence[str]) -> str:
    """The job's command as a shell would need it typed: ``bash -c 'sleep 10 && echo done'``."""
    return shlex.join([command, *args])


def created(job: worker_pb2.CreateJobRes) -> str:
    return (
        "Job created:\n"
        f"ID: {job.id}\n"
        f"Command: {command_line(job.command, job.args)}\n"
        f"Status: {job.status}\n"
        f"StartTime: {job.startTime}\n"
    )


def job_details(job: worker_pb2.GetJobRes) -> str:
    """The spec's "Id: ..." block, plus ExitCode once the job has ended."""
    text = (
        f"Id: {job.id}\n"
        f"Command: {command_line(job.command, job.args)}\n"
        f"Status: {job.status}\n"
        f"Started At: {job.startTime}\n"
        f"Ended At: {job.endTime}\n"
        f"MaxCPU: {job.maxCPU}\n"
        f"MaxMemory: {job.maxMemory}\n"
        f"MaxIOBPS: {job.maxIOBPS}\n"
    )
    if job.status in ENDED_STATUSES:
        text += f"ExitCode: {job.exitCode}\n"
    return text


def job_list(jobs: Sequence[worker_pb2.Job]) -> str:
    return "".join(
        f"{job.id} {job.status} StartTime: {job.startTime}"
        f" Command: {command_line(job.command, job.args)}\n"
        for job in jobs
    )


def stopped(result: worker_pb2.StopJobRes) -> str:
    return f"Job stopped successfully:\nID: {result.id}\nStatus: {result.status}\n"


def as_dict(message: Message) -> dict[str, object]:
    """Every field, named as in the proto (maxCPU, startTime, ...), defaults included,
    in the proto's field order (MessageToDict puts defaulted fields last)."""
    fields: dict[str, object] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {f.name: fields[f.name] for f in message.DESCRIPTOR.fields if f.name in fields}


def as_json(value: Message | Sequence[Message]) -> str:
    """One JSON document: an object for a message, an array for a list of them."""
    if isinstance(value, Message):
        return json.dumps(as_dict(value), indent=2) + "\n"
    return json.dumps([as_dict(item) for item in value], indent=2) + "\n"
