"""TLS for the server: the SSL context (TLS 1.3 only, client certificate required, ALPN h2)
and the handshake with a deadline, which yields the stream and the caller's Identity.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509

from jobworker.server.config import StartupError
from jobworker.server.identity import Identity, identity_from_peer_cert

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca-cert.pem"
SERVER_CERT_FILE = "server-cert.pem"
SERVER_KEY_FILE = "server-key.pem"
ALPN_H2 = "h2"  # grpcio and grpc-go refuse a TLS server that does not select h2
# A refused handshake's alert is sent before the socket closes; a peer that does not take it in
# this long (it stopped reading) loses it.
ALERT_FLUSH_TIMEOUT_S = 1.0

_T = TypeVar("_T")


class CertificateError(StartupError):
    """Raised when the server's certificate files are missing, unreadable or invalid.

    The message is one line for the operator (the server exits 2 with it).
    """


def build_server_context(certs_dir: Path) -> ssl.SSLContext:
    """An SSL context for the server from ``certs_dir``: TLS 1.3 only, CERT_REQUIRED against
    the CA in ca-cert.pem, ALPN h2. Raises CertificateError naming the file at fault."""
    ca = certs_dir / CA_CERT_FILE
    cert = certs_dir / SERVER_CERT_FILE
    key = certs_dir / SERVER_KEY_FILE
    for path in (ca, cert, key):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_H2])
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateError(f"invalid server certificate or key in {certs_dir}: {exc}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateError(f"invalid CA certificate {ca}: {exc}") from None
    return context


class _AlertingTLSStream(TLSStream):
    """anyio's TLS stream, except that a handshake the server refuses ends with its alert.

    When OpenSSL refuses the peer (no certificate, unknown CA, expired), it writes the alert
    that says why (``certificate required``, ``unknown ca``, ``certificate expired``) into the
    outgoing buffer, and anyio raises without sending it: the peer would only see the
    connection close. Here the buffer is flushed first, within a short deadline, so clients
    (openssl s_client, grpcio, grpc-go, ours) can tell the reason.
    """

    async def _call_sslobject_method(  # type: ignore[override]  # anyio's is generic over *args
        self, func: Callable[..., _T], *args: Any
    ) -> _T:
        try:
            return await super()._call_sslobject_method(func, *args)
        except ssl.SSLError:
            if self._write_bio.pending:
                with (
                    anyio.move_on_after(ALERT_FLUSH_TIMEOUT_S),
                    contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.EndOfStream),
                ):
                    await self._send_alert(self._write_bio.read())
            raise

    async def _send_alert(self, alert: bytes) -> None:
        # Send, then half-close and read until the peer hangs up: closing with its bytes
        # unread (a client sends its HTTP/2 preface right after its side of the handshake)
        # would make the kernel answer with a reset, which can overtake the alert.
        transport = self.transport_stream
        await transport.send(alert)
        if isinstance(transport, anyio.abc.SocketStream):
            await transport.send_eof()
            while await transport.receive():
                pass


def server_certificate_expiry(certs_dir: Path) -> dt.datetime:
    """When ``server-cert.pem`` in ``certs_dir`` expires (UTC). Raises CertificateError."""
    path = certs_dir / SERVER_CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    return cert.not_valid_after_utc


@dataclass(frozen=True)
class Peer:
    """A connection that completed the TLS handshake with a verified client certificate."""

    stream: TLSStream
    identity: Identity


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or exc.__class__.__name__).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return str(exc) or exc.__class__.__name__


def failure_kind(exc: BaseException) -> str:
    """A failed handshake, in a few words fit for a metric label."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_certificate"
    if isinstance(exc, ssl.SSLError):
        no_cert = (exc.reason or "").startswith("PEER_DID_NOT_RETURN_A_CERTIFICATE")
        return "no_certificate" if no_cert else "tls_error"
    return "closed"


async def handshake(
    transport: anyio.abc.SocketStream,
    context: ssl.SSLContext,
    timeout: float,  # noqa: ASYNC109 (a per-connection setting, applied inside)
    remote: str,
    failures: collections.Counter[str] | None = None,
) -> Peer | None:
    """Run the server side of the TLS handshake on ``transport`` within ``timeout`` seconds.

    Returns the Peer, or None after logging one line (no traceback) and closing the
    transport when the handshake fails, times out, or the client presented no usable
    certificate; ``failures[kind]`` (see failure_kind) is then incremented. On
    cancellation the transport is closed and Cancelled propagates.
    """
    try:
        with anyio.fail_after(timeout):
            stream = await _AlertingTLSStream.wrap(
                transport, server_side=True, ssl_context=context, standard_compatible=False
            )
    except (OSError, ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        # TimeoutError is an OSError; a client refused by CA / expiry / protocol lands here.
        log.warning("TLS handshake with %s failed: %s", remote, _describe(exc))
        if failures is not None:
            failures[failure_kind(exc)] += 1
        await anyio.aclose_forcefully(transport)
        return None
    except BaseException:
        await anyio.aclose_forcefully(transport)
        raise
    identity = identity_from_peer_cert(stream.extra(TLSAttribute.peer_certificate))  # noqa: S610
    if identity is None:  # cannot happen with CERT_REQUIRED; kept as a guard
        log.warning("TLS connection from %s without a client certificate: closed", remote)
        if failures is not None:
            failures["no_certificate"] += 1
        await anyio.aclose_forcefully(stream)
        return None
    return Peer(stream, identity)
