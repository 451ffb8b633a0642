"""The ``grpc-message`` trailer: percent-encoding as the gRPC HTTP/2 protocol defines it.

The protocol sends a status message as UTF-8, percent-encoding only the bytes outside
0x20-0x7E and ``%`` itself, so every printable ASCII character (``:``, ``(``, spaces) goes as
it is. Clients decode in different ways: grpc-js uses ``decodeURI``, which leaves reserved
escapes such as ``%3A`` undecoded, so escaping more than the protocol asks for reaches Node
clients mangled. Decoding is lenient, as the protocol requires: an escape that is not valid
is kept as it is, and bytes that are not valid UTF-8 become U+FFFD, never an error.
"""

from __future__ import annotations

_PERCENT = ord("%")
_UNENCODED = frozenset(range(0x20, 0x7F)) - {_PERCENT}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def encode_grpc_message(message: str) -> str:
    """The value of a ``grpc-message`` trailer for `message`."""
    raw = message.encode("utf-8", "surrogatepass")
    if all(byte in _UNENCODED for byte in raw):
        return message
    return "".join(chr(byte) if byte in _UNENCODED else f"%{byte:02X}" for byte in raw)


def decode_grpc_message(value: str | bytes) -> str:
    """The status message a ``grpc-message`` trailer carries; never raises."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return raw.decode("utf-8", "replace")
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == _PERCENT and i + 2 < len(raw) and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return out.decode("utf-8", "replace")
