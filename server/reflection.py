"""Server reflection under both names clients ask for: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection serves only ``grpc.reflection.v1alpha``; newer tools (grpcurl,
Postman, gRPC UI, grpc-java and grpc-go's own clients) ask for
``grpc.reflection.v1`` first. v1 is v1alpha renamed: the same messages with the
same field numbers, so the same bytes. Its descriptor is therefore made here from
grpcio-reflection's own (the two cannot drift apart), and its servicer hands every
request to grpcio-reflection's, the messages translated by their bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1}.ServerReflection"


def _v1_service() -> ServiceDescriptor:
    """``grpc.reflection.v1.ServerReflection``, added to the default pool (where reflection looks)."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        return pool.FindServiceByName(V1_SERVICE_NAME)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    proto.name, proto.package = name, V1
    proto.ClearField("options")  # v1alpha's java_package and the like
    alpha, v1 = f".{ALPHA}.", f".{V1}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # a message field (assigning "" would mark a scalar as typed)
                field.type_name = field.type_name.replace(alpha, v1)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(alpha, v1)
        method.output_type = method.output_type.replace(alpha, v1)
    pool.Add(proto)
    return pool.FindServiceByName(V1_SERVICE_NAME)


V1_SERVICE = _v1_service()


class ReflectionV1:
    """``grpc.reflection.v1.ServerReflection``, answered by grpcio-reflection's v1alpha servicer."""

    def __init__(self, alpha: Any) -> None:
        self._alpha = alpha
        method = V1_SERVICE.methods_by_name["ServerReflectionInfo"]
        self._reply = message_factory.GetMessageClass(method.output_type)

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async def as_alpha() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for request in requests:
                yield reflection_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for reply in self._alpha.ServerReflectionInfo(as_alpha(), context):
            yield self._reply.FromString(reply.SerializeToString())


def servicers(names: tuple[str, ...], *private: ServiceDescriptor) -> tuple[Any, ReflectionV1]:
    """The v1alpha and v1 servicers, listing and describing ``names``, the ``private`` services
    (those whose messages live in a descriptor pool of their own, as KServe's do: see
    server/kserve.py) and both reflection services."""
    listed = (*names, *(s.full_name for s in private), reflection.SERVICE_NAME, V1_SERVICE_NAME)
    pool = _pool_of(names, private)
    alpha = reflection.aio.ReflectionServicer(listed, pool=pool)  # type: ignore[attr-defined]
    return alpha, ReflectionV1(alpha)


def _pool_of(
    names: tuple[str, ...], private: tuple[ServiceDescriptor, ...]
) -> descriptor_pool.DescriptorPool:
    """One pool with the files of every service reflection describes, and their imports: the
    default pool's and the private pools' files side by side (their packages differ)."""
    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # imports first
            add(dependency)
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))
        added.add(file.name)

    for name in (*names, reflection.SERVICE_NAME, V1_SERVICE_NAME):
        add(default.FindServiceByName(name).file)
    for service in private:
        add(service.file)
    return pool
