"""Protobuf plumbing: the idemd messages, the service's method table, and a private decoder for
google.rpc.Status / ErrorInfo / BadRequest error details.

The idemd messages are built at import time from the proto's serialized descriptor
(``_descriptor.py``, committed and checked against ``proto/`` by tests/test_packaging.py) rather
than from protoc-generated ``_pb2`` code: nothing is generated at install time (a read-only
checkout or an sdist installs as it is), and no gencode ties users to one protobuf release.

The google.rpc messages are declared here in a private descriptor pool (same field numbers, so
the same wire format) so that idemd-client needs neither googleapis-common-protos nor
grpcio-status, and cannot clash with them when they are installed.
"""
from __future__ import annotations

import types
from typing import Dict, List, Optional, Tuple

# duration_pb2 and timestamp_pb2 register the well-known types the idemd proto imports in the
# default pool; the idemd file joins them there, so its Duration fields take duration_pb2's class.
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, timestamp_pb2  # noqa: F401
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message_factory import GetMessageClass

from . import _descriptor


def _load_messages() -> types.ModuleType:
    file = descriptor_pool.Default().AddSerializedFile(_descriptor.FILE_DESCRIPTOR)
    module = types.ModuleType("idemd_client.pb", "idemd's idempotency.v1 messages and enums.")
    module.DESCRIPTOR = file
    for name, message in file.message_types_by_name.items():
        setattr(module, name, GetMessageClass(message))
    for name, enum in file.enum_types_by_name.items():
        setattr(module, name, EnumTypeWrapper(enum))
        for value in enum.values:
            setattr(module, value.name, value.number)
    return module


#: The idempotency.v1 messages (``pb.AcquireRequest``…) and enum values (``pb.OUTCOME_ACQUIRED``…).
pb = _load_messages()

SERVICE = "/idempotency.v1.IdempotencyService/"

#: method name -> (request class, response class)
METHODS: Dict[str, Tuple[type, type]] = {
    "Acquire": (pb.AcquireRequest, pb.AcquireResponse),
    "Complete": (pb.CompleteRequest, pb.CompleteResponse),
    "Release": (pb.ReleaseRequest, pb.ReleaseResponse),
    "Renew": (pb.RenewRequest, pb.RenewResponse),
    "Get": (pb.GetRequest, pb.GetResponse),
    "Wait": (pb.WaitRequest, pb.WaitResponse),
}


def _build_status_messages():
    fd = descriptor_pb2.FileDescriptorProto()
    fd.name = "idemd_client/private_rpc_status.proto"
    fd.package = "idemd_client.private.rpc"
    fd.syntax = "proto3"
    F = descriptor_pb2.FieldDescriptorProto

    def msg(name: str, fields, nested=None, map_entry=False):
        m = fd.message_type.add() if nested is None else nested.nested_type.add()
        m.name = name
        if map_entry:
            m.options.map_entry = True
        for number, fname, ftype, label, type_name in fields:
            f = m.field.add()
            f.name, f.number, f.type, f.label = fname, number, ftype, label
            if type_name:
                f.type_name = type_name
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    P = ".idemd_client.private.rpc."
    msg("Any", [(1, "type_url", F.TYPE_STRING, opt, None), (2, "value", F.TYPE_BYTES, opt, None)])
    msg(
        "Status",
        [
            (1, "code", F.TYPE_INT32, opt, None),
            (2, "message", F.TYPE_STRING, opt, None),
            (3, "details", F.TYPE_MESSAGE, rep, P + "Any"),
        ],
    )
    info = msg(
        "ErrorInfo",
        [
            (1, "reason", F.TYPE_STRING, opt, None),
            (2, "domain", F.TYPE_STRING, opt, None),
            (3, "metadata", F.TYPE_MESSAGE, rep, P + "ErrorInfo.MetadataEntry"),
        ],
    )
    msg(
        "MetadataEntry",
        [(1, "key", F.TYPE_STRING, opt, None), (2, "value", F.TYPE_STRING, opt, None)],
        nested=info,
        map_entry=True,
    )
    bad = msg("BadRequest", [(1, "field_violations", F.TYPE_MESSAGE, rep, P + "BadRequest.FieldViolation")])
    msg(
        "FieldViolation",
        [
            (1, "field", F.TYPE_STRING, opt, None),
            (2, "description", F.TYPE_STRING, opt, None),
            (3, "reason", F.TYPE_STRING, opt, None),
        ],
        nested=bad,
    )

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)

    def cls(full_name: str):
        desc = pool.FindMessageTypeByName(full_name)
        try:
            from google.protobuf.message_factory import GetMessageClass

            return GetMessageClass(desc)
        except ImportError:  # protobuf < 4.22
            from google.protobuf.message_factory import MessageFactory

            return MessageFactory(pool).GetPrototype(desc)

    return (
        cls("idemd_client.private.rpc.Status"),
        cls("idemd_client.private.rpc.ErrorInfo"),
        cls("idemd_client.private.rpc.BadRequest"),
    )


_Status, _ErrorInfo, _BadRequest = _build_status_messages()

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ErrorDetails:
    """What idemd put into an error's google.rpc.Status details."""

    __slots__ = ("reason", "domain", "metadata", "field_violations")

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.domain: Optional[str] = None
        self.metadata: Dict[str, str] = {}
        #: (field, description) pairs of a google.rpc.BadRequest detail
        self.field_violations: List[Tuple[str, str]] = []


def parse_status_details(trailing_metadata) -> ErrorDetails:
    """Decode the ErrorInfo/BadRequest details from a call's trailing metadata (never raises)."""
    out = ErrorDetails()
    raw = None
    try:
        for item in trailing_metadata or ():
            key, value = item[0], item[1]
            if key == STATUS_DETAILS_KEY:
                raw = value
                break
    except Exception:  # noqa: BLE001 - malformed metadata must not mask the real error
        return out
    if not raw:
        return out
    try:
        status = _Status.FromString(bytes(raw))
    except Exception:  # noqa: BLE001
        return out
    for detail in status.details:
        try:
            if detail.type_url.endswith("/google.rpc.ErrorInfo") and out.reason is None:
                info = _ErrorInfo.FromString(detail.value)
                out.reason = info.reason or None
                out.domain = info.domain or None
                out.metadata = dict(info.metadata)
            elif detail.type_url.endswith("/google.rpc.BadRequest"):
                bad = _BadRequest.FromString(detail.value)
                out.field_violations.extend((v.field, v.description) for v in bad.field_violations)
        except Exception:  # noqa: BLE001
            continue
    return out
