"""How results look: the spec's text blocks, or JSON with the proto field names.

Text output is for a terminal (or a pipe read by people): every field in it is escaped, so
that nothing a job's creator or a server sends can start a line, move the cursor, change
colours or reorder text (control characters C0, DEL and C1, hence every ESC sequence; line
and paragraph separators; bidirectional overrides). JSON output is exact.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from jobworker.api import worker_pb2

# Statuses after which a job never changes again (LOST: the worker restarted under it).
ENDED_STATUSES = frozenset({"COMPLETED", "FAILED", "STOPPED", "LOST"})


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    # \xHH is a byte in bash's $'...': above ASCII, only \uHHHH means the character.
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every unsafe character written as a backslash escape (``\\n``,
    ``\\x1b``, ``\\u202e``): one line, inert on any terminal."""
    return _UNSAFE.sub(_escape_char, text)


def shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell; with unsafe characters, in bash's ``$'...'`` form,
    which a shell turns back into exactly ``word``."""
    if not _UNSAFE.search(word):
        return shlex.quote(word)
    return "$'" + escape(word.replace("\\", "\\\\").replace("'", "\\'")) + "'"


def command_line(command: str, args: Sequence[str]) -> str:
    """The job's command as a shell would need it typed: ``bash -c 'sleep 10 && echo done'``,
    ``echo $'\\x1b[31m'``."""
    return " ".join(shell_word(word) for word in (command, *args))


def created(job: worker_pb2.CreateJobRes) -> str:
    return (
        "Job created:\n"
        f"ID: {escape(job.id)}\n"
        f"Command: {command_line(job.command, job.args)}\n"
        f"Status: {escape(job.status)}\n"
        f"StartTime: {escape(job.startTime)}\n"
    )


def job_details(job: worker_pb2.GetJobRes) -> str:
    """The spec's "Id: ..." block, plus ExitCode once the job has ended, then what the server
    says beyond the spec: Reason and Owner when it sends them, Usage, and Timeout, Env (as
    shell words, by name) and WorkingDir when set."""
    text = (
        f"Id: {escape(job.id)}\n"
        f"Command: {command_line(job.command, job.args)}\n"
        f"Status: {escape(job.status)}\n"
        f"Started At: {escape(job.startTime)}\n"
        f"Ended At: {escape(job.endTime)}\n"
        f"MaxCPU: {job.maxCPU}\n"
        f"MaxMemory: {job.maxMemory}\n"
        f"MaxIOBPS: {job.maxIOBPS}\n"
    )
    if job.status in ENDED_STATUSES:
        text += f"ExitCode: {job.exitCode}\n"
    if job.reason:
        text += f"Reason: {escape(job.reason)}\n"
    if job.owner:
        text += f"Owner: {escape(job.owner)}\n"
    if job.HasField("usage"):
        usage = job.usage
        text += (
            f"Usage: cpu {usage.cpuSeconds:.2f} s, peak memory "
            f"{usage.peakMemoryBytes / 1e6:.1f} MB, output {usage.outputBytes:,} bytes\n"
        )
    if job.timeoutSeconds:
        text += f"Timeout: {job.timeoutSeconds} s\n"
    if job.env:
        text += f"Env: {' '.join(shell_word(f'{k}={v}') for k, v in sorted(job.env.items()))}\n"
    if job.workingDir:
        text += f"WorkingDir: {escape(job.workingDir)}\n"
    return text


def job_list(jobs: Sequence[worker_pb2.Job]) -> str:
    return "".join(
        f"{escape(job.id)} {escape(job.status)} StartTime: {escape(job.startTime)}"
        f" Command: {command_line(job.command, job.args)}\n"
        for job in jobs
    )


def stopped(result: worker_pb2.StopJobRes) -> str:
    return f"Job stopped successfully:\nID: {escape(result.id)}\nStatus: {escape(result.status)}\n"


def deleted(result: worker_pb2.DeleteJobRes) -> str:
    return f"Job deleted:\nID: {escape(result.id)}\n"


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


def chunk_json(offset: int, payload: bytes) -> str:
    """One line of ``stream -o json``: the chunk's offset in the job's output and its bytes
    in base64 (output is bytes, not text): ``{"offset": 0, "payload": "aGkK"}``."""
    return json.dumps({"offset": offset, "payload": base64.b64encode(payload).decode()}) + "\n"
