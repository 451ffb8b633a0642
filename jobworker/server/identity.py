"""Who is calling: the identity read from the verified client certificate, once per
connection (tls.py); the connection handler passes it to each RPC of the connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NO_ROLE = "none"  # how a certificate without (exactly one) OU is named in messages and logs


@dataclass(frozen=True)
class Identity:
    """The caller: ``name`` is the subject CN, ``role`` the subject OU (None when absent)."""

    name: str
    role: str | None

    @property
    def role_label(self) -> str:
        """The role as shown to people: the OU, or ``none`` for a certificate without one."""
        return self.role if self.role is not None else NO_ROLE


def identity_from_peer_cert(cert: dict[str, Any] | None) -> Identity | None:
    """Build the Identity from ``SSLObject.getpeercert()``'s dict (None: no certificate).

    A subject with several different OUs is ambiguous: it gets no role (so it is allowed
    nothing) rather than whichever OU happens to come first.
    """
    if not cert:
        return None
    names: list[str] = []
    units: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
            elif key == "organizationalUnitName":
                units.append(str(value))
    distinct_units = set(units)
    role = units[0] if len(distinct_units) == 1 else None
    return Identity(name=names[0] if names else "", role=role)
