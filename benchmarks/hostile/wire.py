"""Protobuf wire format by hand: what a real client's serializer would never write.

The generated classes refuse to build invalid messages (a lone surrogate, a negative
``uint32``), so hostile bytes are written here from the wire-format rules instead:
a key is ``field << 3 | wire_type``, integers are base-128 varints, strings are a
varint length followed by that many bytes.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
UINT64 = 1 << 64


def varint(value: int) -> bytes:
    """Base-128, least significant group first; values past 64 bits make over-long varints on purpose."""
    if value < 0:
        value += UINT64  # how protobuf writes a negative int32/int64: ten bytes of two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def varint_field(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def len_field(field: int, payload: bytes, *, claimed: int | None = None) -> bytes:
    """A length-delimited field; ``claimed`` writes a length prefix that lies about ``payload``."""
    return key(field, LEN) + varint(len(payload) if claimed is None else claimed) + payload


def number(message: type[Message], name: str) -> int:
    """A field's number, from the descriptor: the payloads follow the proto if it is renumbered."""
    return int(message.DESCRIPTOR.fields_by_name[name].number)


def parses(message: type[Message], data: bytes) -> bool:
    """Whether protobuf itself accepts ``data`` as a ``message`` (unknown fields are accepted)."""
    try:
        message.FromString(data)
    except DecodeError:
        return False
    return True
