"""Mutual TLS for the client: the SSL context, TCP + handshake, and failure messages.

Every failure becomes a ConnectError whose message says which step failed,
in words a user can act on; no ssl/OS exception text reaches the user raw.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
from pathlib import Path

import trio

from jobworker.client.address import ServerAddress
from jobworker.errors import ConnectError, leaves

ALPN_H2 = "h2"  # gRPC servers (grpcio, ours) refuse a TLS client that does not offer h2
# A server that vanishes without a FIN (host down, cable cut) is noticed by TCP
# keepalive after about KEEPIDLE + KEEPCNT * KEEPINTVL = 60 s, even while a
# stream is idle; unary calls have their own deadline anyway.
TCP_KEEPIDLE_S = 30
TCP_KEEPINTVL_S = 10
TCP_KEEPCNT = 3


def client_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting cert/key and trusting only the CA in ``ca``.

    Raises ConnectError naming the file and what is wrong with it: ``missing certificate
    file at PATH``, ``certificate file is a directory: PATH``, ``cannot load certificate
    PATH: not a PEM certificate``, ``key PATH does not match certificate PATH``, ... Never
    prompts for a pass phrase and never opens anything but a regular file.
    """
    for what, path in (("certificate", cert), ("key", key), ("CA certificate", ca)):
        _check_file(what, path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # the spec: gRPC over TLS 1.3
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError:
        raise ConnectError(f"cannot load CA certificate {ca}: {NOT_PEM_CERTIFICATE}") from None
    except OSError as exc:
        raise ConnectError(f"cannot load CA certificate {ca}: {describe_os_error(exc)}") from None
    try:
        context.load_cert_chain(str(cert), str(key), password=_refuse_pass_phrase)
    except _EncryptedKey:
        raise ConnectError(
            f"cannot load key {key}: it is encrypted (give an unencrypted key)"
        ) from None
    except ssl.SSLError as exc:
        raise _chain_failure(cert, key, exc) from None
    except OSError as exc:
        raise ConnectError(f"cannot load certificate {cert}: {describe_os_error(exc)}") from None
    context.set_alpn_protocols([ALPN_H2])
    return context


NOT_PEM_CERTIFICATE = "not a PEM certificate"


class _EncryptedKey(Exception):
    """Raised by the pass-phrase callback: OpenSSL would otherwise prompt on the terminal."""


def _refuse_pass_phrase() -> str:
    raise _EncryptedKey


def _check_file(what: str, path: str | Path) -> None:
    """A regular file must be there (a FIFO or a device would block or never end)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ConnectError(f"missing certificate file at {path}") from None
    except OSError as exc:
        raise ConnectError(f"cannot read {what} file {path}: {describe_os_error(exc)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConnectError(f"{what} file is a directory: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise ConnectError(f"{what} file is not a regular file: {path}")


def _chain_failure(cert: str | Path, key: str | Path, exc: ssl.SSLError) -> ConnectError:
    """Which of the two files OpenSSL refused: its "PEM lib" error does not say."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return ConnectError(f"key {key} does not match certificate {cert}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        return ConnectError(f"cannot load certificate {cert}: {NOT_PEM_CERTIFICATE}")
    except OSError as error:
        return ConnectError(f"cannot load certificate {cert}: {describe_os_error(error)}")
    return ConnectError(f"cannot load key {key}: not a PEM private key")


async def open_tls_stream(
    address: ServerAddress, context: ssl.SSLContext, client_cert: str | Path
) -> trio.SSLStream[trio.SocketStream]:
    """Connect over TCP and complete the TLS handshake.

    No deadline of its own: the caller wraps it. On cancellation or failure the
    socket is closed before the exception leaves.
    """
    try:
        tcp = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {describe_os_error(exc)}") from None
    try:
        _set_keepalive(tcp.socket)
        tls = trio.SSLStream(tcp, context, server_hostname=address.host, https_compatible=False)
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise tls_failure(address, exc, client_cert) from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


# The alerts (as describe_ssl_error words them) by which a server says it refuses the client
# certificate itself, rather than the handshake for some other reason.
CERTIFICATE_ALERTS = frozenset(
    {
        "certificate required",
        "unknown CA",
        "certificate expired",
        "bad certificate",
        "certificate revoked",
        "certificate unknown",
        "unsupported certificate",
        "access denied",
    }
)


def tls_failure(
    address: ServerAddress,
    exc: BaseException,
    client_cert: str | Path,
    *,
    after_handshake: bool = False,
) -> ConnectError:
    """Translate a broken TLS stream (handshake or first read) into a ConnectError.

    Under TLS 1.3 the server checks our certificate after our side of the
    handshake has finished, so its refusal shows up on the first read
    (``after_handshake``): as an alert naming the reason, or, from servers that
    do not flush the alert (Python/Trio/AnyIO ones), as a bare EOF or reset.
    """
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ConnectError(f"certificate verify failed: {cause.verify_message}")
    if isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or ""):
        reason = describe_ssl_error(cause)
        if reason in CERTIFICATE_ALERTS:
            return ConnectError(f"the server refused our certificate: {reason}")
        return ConnectError(
            f"TLS handshake refused by server: {reason} (client certificate {client_cert})"
        )
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
        return ConnectError(f"TLS handshake with {address} failed: {describe_ssl_error(cause)}")
    if after_handshake:
        return ConnectError(
            "TLS handshake refused by server: connection closed before the session started"
            f" (is the client certificate {client_cert} valid and signed by the server's CA?)"
        )
    return ConnectError(f"cannot connect to {address}: connection closed during TLS handshake")


def describe_ssl_error(exc: BaseException) -> str:
    """'SSLV3_ALERT_CERTIFICATE_EXPIRED' -> 'certificate expired'; OS errors -> their strerror."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and isinstance(reason, str) and reason:
        text = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
        return " ".join("CA" if word == "ca" else word for word in text.split())
    if isinstance(exc, ssl.SSLError):  # no reason: its errno is OpenSSL's, not the OS's
        return f"TLS library error ({exc.library or 'unknown'})"
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """The most specific strerror in exc or its causes ("connection refused", "timed out")."""
    candidates: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        candidates[:0] = leaves(cause)
    elif cause is not None:
        candidates.insert(0, cause)
    for candidate in candidates:
        if not isinstance(candidate, OSError):
            continue
        # trio words its strerror "error connecting to (addr): ..."; the errno is plainer
        if isinstance(candidate.errno, int) and candidate.errno > 0:
            text = os.strerror(candidate.errno)
        elif candidate.strerror:  # getaddrinfo errors have negative codes
            text = candidate.strerror
        else:
            continue
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _set_keepalive(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    with contextlib.suppress(AttributeError, OSError):  # Linux names; harmless elsewhere
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
