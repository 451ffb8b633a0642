"""The standard server reflection service, ``grpc.reflection.v1`` and ``v1alpha``, so that
grpcurl and other generic clients can list and describe our services without the proto.

Both versions are one bidirectional RPC (``ServerReflectionInfo``) with the same messages;
v1 only renamed the package, so both are served by one implementation over the v1alpha
message classes of ``grpcio-reflection`` (the bytes on the wire are the same). That package
ships no v1 module: the v1 file descriptor is derived from v1alpha's by renaming it, so that
reflection can describe itself under both names.

Answers come from a private descriptor pool holding exactly the files of the services we
serve (and their imports): nothing else the process happens to have loaded is exposed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from jobworker.api import worker_pb2
from jobworker.errors import echo
from jobworker.server.auth import REFLECTION_SERVICES
from jobworker.server.context import CallContext
from jobworker.server.service import Method, ReceiveMessage, SendMessage

NOT_FOUND = 5  # grpc.StatusCode.NOT_FOUND, carried in an ErrorResponse
INVALID_ARGUMENT = 3
V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
V1_PACKAGE = "grpc.reflection.v1"


def _v1_file(v1alpha: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """v1's reflection.proto: v1alpha's with the package (and file name) renamed."""
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(v1alpha)
    v1.name = v1alpha.name.replace("v1alpha", "v1")
    v1.package = V1_PACKAGE
    v1.ClearField("options")  # java/objc package options of v1alpha do not apply
    prefix = f".{V1ALPHA_PACKAGE}."
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(prefix):
                field.type_name = f".{V1_PACKAGE}.{field.type_name[len(prefix) :]}"
    for service in v1.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                name = getattr(method, attr)
                if name.startswith(prefix):
                    setattr(method, attr, f".{V1_PACKAGE}.{name[len(prefix) :]}")
    return v1


def _file_proto(descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def build_pool(files: Iterable[Any]) -> descriptor_pool.DescriptorPool:
    """A pool with ``files`` (FileDescriptors), their imports, and reflection v1 itself."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(descriptor: Any) -> None:
        if descriptor.name in added:
            return
        for dependency in descriptor.dependencies:
            add(dependency)
        pool.Add(_file_proto(descriptor))
        added.add(descriptor.name)

    for file in files:
        add(file)
    pool.Add(_v1_file(_file_proto(reflection_pb2.DESCRIPTOR)))
    return pool


class Reflection:
    """Serves ServerReflectionInfo under both names, over a pool of our own files."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self._services = sorted(set(service_names) | set(REFLECTION_SERVICES))
        self._pool = build_pool(
            [worker_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
        )

    def methods(self) -> dict[tuple[str, str], Method]:
        """(service, method) -> Method, for the connection handler's table."""
        method = Method(reflection_pb2.ServerReflectionRequest, bidi=self.info)
        return {(service, "ServerReflectionInfo"): method for service in REFLECTION_SERVICES}

    async def info(self, receive: ReceiveMessage, send: SendMessage, context: CallContext) -> None:
        """One response per request, in order, until the client ends its requests."""
        while (request := await receive()) is not None:
            await send(self.answer(request))

    def answer(self, request: Any) -> Any:
        """The response to one ServerReflectionRequest (errors as an ErrorResponse, as the
        protocol wants: the stream itself goes on)."""
        kind = request.WhichOneof("message_request")
        response = reflection_pb2.ServerReflectionResponse(
            valid_host=request.host, original_request=request
        )
        try:
            if kind == "list_services":
                for name in self._services:
                    response.list_services_response.service.add(name=name)
            elif kind == "file_by_filename":
                self._files(response, self._pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                symbol = request.file_containing_symbol
                self._files(response, self._pool.FindFileContainingSymbol(symbol))
            elif kind == "file_containing_extension":
                ext = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(ext.containing_type)
                extension = self._pool.FindExtensionByNumber(message, ext.extension_number)
                self._files(response, extension.file)
            elif kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = response.all_extension_numbers_response
                numbers.base_type_name = message.full_name
                numbers.extension_number.extend(
                    sorted(e.number for e in self._pool.FindAllExtensions(message))
                )
            else:
                response.error_response.error_code = INVALID_ARGUMENT
                response.error_response.error_message = "no request kind set"
        except KeyError:
            response.ClearField("message_response")
            wanted = str(getattr(request, kind or "host", ""))
            response.error_response.error_code = NOT_FOUND
            response.error_response.error_message = f"not found: {echo(wanted)}"
        return response

    def _files(self, response: Any, descriptor: Any) -> None:
        """``descriptor``'s file and every file it imports, transitively (clients resolve
        the types a file refers to from these)."""
        seen: dict[str, Any] = {}
        todo = [descriptor]
        while todo:
            file = todo.pop()
            if file.name not in seen:
                seen[file.name] = file
                todo.extend(file.dependencies)
        protos = response.file_descriptor_response.file_descriptor_proto
        protos.extend(_file_proto(file).SerializeToString() for file in seen.values())
