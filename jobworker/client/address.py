"""Server address forms the client accepts: ``host:port``, ``[v6]:port``, ``host``, ``[v6]``."""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.wire.contract import DEFAULT_PORT

MAX_PORT = 65535


@dataclass(frozen=True)
class ServerAddress:
    """A parsed server address. ``host`` has no brackets; ``str()`` gives them back."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_server(text: str) -> ServerAddress:
    """Parse a server address; raises ValueError with a message for people.

    A bare IPv6 address without brackets (``::1``) is taken as a host with the
    default port, since its last colon cannot be told apart from a port separator.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty server address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid server address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid server address {text!r}: expected ':' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"invalid server address {text!r}: no host")
    if port_text is None:
        return ServerAddress(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) <= MAX_PORT:
        raise ValueError(f"invalid server address {text!r}: port must be 1-{MAX_PORT}")
    return ServerAddress(host, int(port_text))
