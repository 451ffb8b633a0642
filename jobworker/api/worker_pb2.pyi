from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Job(_message.Message):
    __slots__ = ("id", "command", "args", "maxCPU", "maxMemory", "maxIOBPS", "status", "startTime", "endTime", "exitCode", "reason", "owner", "usage", "timeoutSeconds", "env", "workingDir")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    MAXCPU_FIELD_NUMBER: _ClassVar[int]
    MAXMEMORY_FIELD_NUMBER: _ClassVar[int]
    MAXIOBPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTTIME_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    EXITCODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTSECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKINGDIR_FIELD_NUMBER: _ClassVar[int]
    id: str
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    maxCPU: int
    maxMemory: int
    maxIOBPS: int
    status: str
    startTime: str
    endTime: str
    exitCode: int
    reason: str
    owner: str
    usage: JobUsage
    timeoutSeconds: int
    env: _containers.ScalarMap[str, str]
    workingDir: str
    def __init__(self, id: _Optional[str] = ..., command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., maxCPU: _Optional[int] = ..., maxMemory: _Optional[int] = ..., maxIOBPS: _Optional[int] = ..., status: _Optional[str] = ..., startTime: _Optional[str] = ..., endTime: _Optional[str] = ..., exitCode: _Optional[int] = ..., reason: _Optional[str] = ..., owner: _Optional[str] = ..., usage: _Optional[_Union[JobUsage, _Mapping]] = ..., timeoutSeconds: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., workingDir: _Optional[str] = ...) -> None: ...

class JobUsage(_message.Message):
    __slots__ = ("cpuSeconds", "peakMemoryBytes", "outputBytes", "ioReadBytes", "ioWriteBytes")
    CPUSECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAKMEMORYBYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTBYTES_FIELD_NUMBER: _ClassVar[int]
    IOREADBYTES_FIELD_NUMBER: _ClassVar[int]
    IOWRITEBYTES_FIELD_NUMBER: _ClassVar[int]
    cpuSeconds: float
    peakMemoryBytes: int
    outputBytes: int
    ioReadBytes: int
    ioWriteBytes: int
    def __init__(self, cpuSeconds: _Optional[float] = ..., peakMemoryBytes: _Optional[int] = ..., outputBytes: _Optional[int] = ..., ioReadBytes: _Optional[int] = ..., ioWriteBytes: _Optional[int] = ...) -> None: ...

class CreateJobReq(_message.Message):
    __slots__ = ("command", "args", "maxCPU", "maxMemory", "maxIOBPS", "timeoutSeconds", "env", "workingDir", "requestId")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    MAXCPU_FIELD_NUMBER: _ClassVar[int]
    MAXMEMORY_FIELD_NUMBER: _ClassVar[int]
    MAXIOBPS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTSECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKINGDIR_FIELD_NUMBER: _ClassVar[int]
    REQUESTID_FIELD_NUMBER: _ClassVar[int]
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    maxCPU: int
    maxMemory: int
    maxIOBPS: int
    timeoutSeconds: int
    env: _containers.ScalarMap[str, str]
    workingDir: str
    requestId: str
    def __init__(self, command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., maxCPU: _Optional[int] = ..., maxMemory: _Optional[int] = ..., maxIOBPS: _Optional[int] = ..., timeoutSeconds: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., workingDir: _Optional[str] = ..., requestId: _Optional[str] = ...) -> None: ...

class CreateJobRes(_message.Message):
    __slots__ = ("id", "command", "args", "maxCPU", "maxMemory", "maxIOBPS", "status", "startTime", "endTime", "exitCode", "reason", "owner", "usage", "timeoutSeconds", "env", "workingDir")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    MAXCPU_FIELD_NUMBER: _ClassVar[int]
    MAXMEMORY_FIELD_NUMBER: _ClassVar[int]
    MAXIOBPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTTIME_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    EXITCODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTSECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKINGDIR_FIELD_NUMBER: _ClassVar[int]
    id: str
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    maxCPU: int
    maxMemory: int
    maxIOBPS: int
    status: str
    startTime: str
    endTime: str
    exitCode: int
    reason: str
    owner: str
    usage: JobUsage
    timeoutSeconds: int
    env: _containers.ScalarMap[str, str]
    workingDir: str
    def __init__(self, id: _Optional[str] = ..., command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., maxCPU: _Optional[int] = ..., maxMemory: _Optional[int] = ..., maxIOBPS: _Optional[int] = ..., status: _Optional[str] = ..., startTime: _Optional[str] = ..., endTime: _Optional[str] = ..., exitCode: _Optional[int] = ..., reason: _Optional[str] = ..., owner: _Optional[str] = ..., usage: _Optional[_Union[JobUsage, _Mapping]] = ..., timeoutSeconds: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., workingDir: _Optional[str] = ...) -> None: ...

class GetJobReq(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobRes(_message.Message):
    __slots__ = ("id", "command", "args", "maxCPU", "maxMemory", "maxIOBPS", "status", "startTime", "endTime", "exitCode", "reason", "owner", "usage", "timeoutSeconds", "env", "workingDir")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    MAXCPU_FIELD_NUMBER: _ClassVar[int]
    MAXMEMORY_FIELD_NUMBER: _ClassVar[int]
    MAXIOBPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTTIME_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    EXITCODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTSECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKINGDIR_FIELD_NUMBER: _ClassVar[int]
    id: str
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    maxCPU: int
    maxMemory: int
    maxIOBPS: int
    status: str
    startTime: str
    endTime: str
    exitCode: int
    reason: str
    owner: str
    usage: JobUsage
    timeoutSeconds: int
    env: _containers.ScalarMap[str, str]
    workingDir: str
    def __init__(self, id: _Optional[str] = ..., command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., maxCPU: _Optional[int] = ..., maxMemory: _Optional[int] = ..., maxIOBPS: _Optional[int] = ..., status: _Optional[str] = ..., startTime: _Optional[str] = ..., endTime: _Optional[str] = ..., exitCode: _Optional[int] = ..., reason: _Optional[str] = ..., owner: _Optional[str] = ..., usage: _Optional[_Union[JobUsage, _Mapping]] = ..., timeoutSeconds: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., workingDir: _Optional[str] = ...) -> None: ...

class StopJobReq(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StopJobRes(_message.Message):
    __slots__ = ("id", "status", "endTime", "exitCode", "reason", "usage")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENDTIME_FIELD_NUMBER: _ClassVar[int]
    EXITCODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: str
    endTime: str
    exitCode: int
    reason: str
    usage: JobUsage
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., endTime: _Optional[str] = ..., exitCode: _Optional[int] = ..., reason: _Optional[str] = ..., usage: _Optional[_Union[JobUsage, _Mapping]] = ...) -> None: ...

class EmptyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Jobs(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class GetJobsStreamReq(_message.Message):
    __slots__ = ("id", "noFollow", "offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    NOFOLLOW_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    noFollow: bool
    offset: int
    def __init__(self, id: _Optional[str] = ..., noFollow: _Optional[bool] = ..., offset: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ListJobsReq(_message.Message):
    __slots__ = ("pageSize", "pageToken", "status", "owner", "newestFirst")
    PAGESIZE_FIELD_NUMBER: _ClassVar[int]
    PAGETOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NEWESTFIRST_FIELD_NUMBER: _ClassVar[int]
    pageSize: int
    pageToken: str
    status: _containers.RepeatedScalarFieldContainer[str]
    owner: str
    newestFirst: bool
    def __init__(self, pageSize: _Optional[int] = ..., pageToken: _Optional[str] = ..., status: _Optional[_Iterable[str]] = ..., owner: _Optional[str] = ..., newestFirst: _Optional[bool] = ...) -> None: ...

class ListJobsRes(_message.Message):
    __slots__ = ("jobs", "nextPageToken")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXTPAGETOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    nextPageToken: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., nextPageToken: _Optional[str] = ...) -> None: ...

class DeleteJobReq(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteJobRes(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
