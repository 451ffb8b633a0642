"""systemd's readiness protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``.

Written here rather than taken from a library: it is one ``sendto`` of ``KEY=VALUE`` lines
to a Unix datagram socket (a name starting with ``@`` is in the abstract namespace). Without
``$NOTIFY_SOCKET`` (not under systemd) it does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("jobworker.server")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(*fields: str) -> bool:
    """Send ``fields`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to the service manager.

    Never blocks (a datagram socket in non-blocking mode) and never raises: a manager that
    does not listen costs one WARNING. Returns whether the datagram was sent.
    """
    address = os.environ.get(NOTIFY_SOCKET_ENV)
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc.strerror or exc)
        return False
    return True
