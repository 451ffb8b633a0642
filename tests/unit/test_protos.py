"""The committed generated code must match protos/worker.proto, and the contract must not drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from jobworker.api import worker_pb2

ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"
API_DIR = ROOT / "jobworker" / "api"


def _compiled_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "worker.desc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--descriptor_set_out={out}",
            "worker.proto",
        ],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return _without_json_names(fds.file[0])


def _without_json_names(
    proto: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    # protoc's descriptor set spells out json_name; the embedded descriptor may not. Nested
    # messages too (a map field's entry type).
    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return proto


def test_committed_messages_match_the_proto(tmp_path: Path) -> None:
    committed = _without_json_names(
        descriptor_pb2.FileDescriptorProto.FromString(worker_pb2.DESCRIPTOR.serialized_pb)
    )
    assert committed == _compiled_descriptor(tmp_path), (
        "jobworker/api/worker_pb2.py is stale: run `nox -s protos`"
    )


def test_committed_generated_files_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(GEN_SCRIPT), str(tmp_path)], check=True)
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_grpc.py", "worker_pb2_grpc.py"):
        fresh = (tmp_path / name).read_text()
        committed = (API_DIR / name).read_text()
        assert fresh == committed, f"jobworker/api/{name} is stale: run `nox -s protos`"


# The wire contract of the spec, and of our additions (new numbers only; clients rely on the
# names too): (message, field) -> (number, type, repeated).
STRING, INT32, BYTES, MESSAGE, BOOL = (
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
)
JOB_FIELDS = {
    "id": (1, STRING, False),
    "command": (2, STRING, False),
    "args": (3, STRING, True),
    "maxCPU": (4, INT32, False),
    "maxMemory": (5, INT32, False),
    "maxIOBPS": (6, INT32, False),
    "status": (7, STRING, False),
    "startTime": (8, STRING, False),
    "endTime": (9, STRING, False),
    "exitCode": (10, INT32, False),
}
CONTRACT = {
    "Job": JOB_FIELDS,
    "CreateJobRes": JOB_FIELDS,
    "GetJobRes": JOB_FIELDS,
    "Jobs": {"jobs": (1, MESSAGE, True)},
    "EmptyRequest": {},
    "CreateJobReq": {
        "command": (1, STRING, False),
        "args": (2, STRING, True),
        "maxCPU": (3, INT32, False),
        "maxMemory": (4, INT32, False),
        "maxIOBPS": (5, INT32, False),
    },
    "GetJobReq": {"id": (1, STRING, False)},
    "StopJobReq": {"id": (1, STRING, False)},
    "GetJobsStreamReq": {"id": (1, STRING, False), "noFollow": (2, BOOL, False)},
    "StopJobRes": {
        "id": (1, STRING, False),
        "status": (2, STRING, False),
        "endTime": (3, STRING, False),
        "exitCode": (4, INT32, False),
    },
    "DataChunk": {"payload": (1, BYTES, False)},
    "ListJobsReq": {
        "pageSize": (1, INT32, False),
        "pageToken": (2, STRING, False),
        "status": (3, STRING, True),
        "owner": (4, STRING, False),
        "newestFirst": (5, BOOL, False),
    },
    "ListJobsRes": {"jobs": (1, MESSAGE, True), "nextPageToken": (2, STRING, False)},
}


@pytest.mark.parametrize("message", sorted(CONTRACT))
def test_spec_fields_keep_their_names_and_numbers(message: str) -> None:
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(worker_pb2.DESCRIPTOR.serialized_pb)
    descriptor = next(m for m in file_proto.message_type if m.name == message)
    repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    actual = {
        f.name: (f.number, f.type, f.label == repeated)
        for f in descriptor.field
        if f.number in {n for n, _, _ in CONTRACT[message].values()}
    }
    assert actual == CONTRACT[message]


def test_service_has_the_spec_methods_and_list_jobs() -> None:
    service = worker_pb2.DESCRIPTOR.services_by_name["JobService"]
    assert worker_pb2.DESCRIPTOR.package == "job_worker"
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods
    }
    assert methods == {
        "CreateJob": ("CreateJobReq", "CreateJobRes", False),
        "GetJob": ("GetJobReq", "GetJobRes", False),
        "StopJob": ("StopJobReq", "StopJobRes", False),
        "GetJobs": ("EmptyRequest", "Jobs", False),
        "GetJobsStream": ("GetJobsStreamReq", "DataChunk", True),
        "ListJobs": ("ListJobsReq", "ListJobsRes", False),
        "DeleteJob": ("DeleteJobReq", "DeleteJobRes", False),
    }
