"""The ``role-limits`` setting: the most a job created by each role may ask for.

One text for the flag, the environment and the config file::

    ROLE:cpu=PERCENT,memory=MB,iobps=BYTES_PER_S,timeout=SECONDS[;ROLE:...]

e.g. ``admin:cpu=400,memory=8192;viewer:memory=1024,timeout=600``. Each key is optional
(a key left out: no ceiling on it); a role may appear once, and must be one of the role
table (a misspelt role would otherwise limit nobody). The engine applies the ceilings
(jobworker.engine.quotas).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from jobworker.engine import RoleCeiling
from jobworker.engine.spec import MAX_TIMEOUT_SECONDS
from jobworker.server.auth import ROLE_TABLE

__all__ = ["ROLE_LIMIT_KEYS", "RoleLimits", "parse_role_limits"]

# Setting key -> RoleCeiling field; the keys mirror CreateJobReq's maxCPU, maxMemory,
# maxIOBPS and timeoutSeconds.
ROLE_LIMIT_KEYS = {
    "cpu": "cpu_percent",
    "memory": "memory_mb",
    "iobps": "io_bps",
    "timeout": "timeout_s",
}
KNOWN_ROLES = sorted(frozenset[str]().union(*(rule.roles for rule in ROLE_TABLE.values())))
# A ceiling beyond what the field's int32 can carry would be no ceiling.
_MAX_VALUE = {"timeout": MAX_TIMEOUT_SECONDS, "cpu": 2**31 - 1, "memory": 2**31 - 1}


@dataclass(frozen=True)
class RoleLimits:
    """The ceilings of the roles that have one. ``str()`` is the setting's text, which
    ``parse_role_limits`` reads back."""

    ceilings: tuple[RoleCeiling, ...]

    def by_role(self) -> dict[str, RoleCeiling]:
        """role -> its ceiling."""
        return {ceiling.role: ceiling for ceiling in self.ceilings}

    def __str__(self) -> str:
        return ";".join(_format(ceiling) for ceiling in self.ceilings)


def _format(ceiling: RoleCeiling) -> str:
    parts = [
        f"{key}={value}"
        for key, name in ROLE_LIMIT_KEYS.items()
        if (value := getattr(ceiling, name)) is not None
    ]
    return f"{ceiling.role}:{','.join(parts)}"


def parse_role_limits(text: str) -> RoleLimits:
    """The setting's text -> RoleLimits (an argparse type: ArgumentTypeError saying what is
    wrong and where)."""
    ceilings: list[RoleCeiling] = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        role, sep, items = entry.partition(":")
        role = role.strip()
        if not sep or not role:
            raise argparse.ArgumentTypeError(
                f"expected ROLE:KEY=N[,KEY=N...] (e.g. admin:cpu=400,memory=8192), got {entry!r}"
            )
        if role not in KNOWN_ROLES:
            raise argparse.ArgumentTypeError(
                f"unknown role {role!r} (roles: {', '.join(KNOWN_ROLES)})"
            )
        if any(ceiling.role == role for ceiling in ceilings):
            raise argparse.ArgumentTypeError(f"role {role!r} is given twice")
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in items.split(","))):
            key, _, number = (word.strip() for word in item.partition("="))
            if key not in ROLE_LIMIT_KEYS:
                raise argparse.ArgumentTypeError(
                    f"{role}: unknown limit {key!r} (limits: {', '.join(ROLE_LIMIT_KEYS)})"
                )
            if key in values:
                raise argparse.ArgumentTypeError(f"{role}: {key} is given twice")
            values[key] = _positive(role, key, number)
        if not values:
            raise argparse.ArgumentTypeError(f"{role}: no limit given")
        ceilings.append(
            RoleCeiling(role, **{ROLE_LIMIT_KEYS[key]: value for key, value in values.items()})
        )
    if not ceilings:
        raise argparse.ArgumentTypeError(f"no role limits in {text!r}")
    return RoleLimits(tuple(ceilings))


def _positive(role: str, key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{role}: {key}: not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{role}: {key}: must be >= 1: {text!r}")
    highest = _MAX_VALUE.get(key, 2**63 - 1)
    if value > highest:
        raise argparse.ArgumentTypeError(f"{role}: {key}: must be <= {highest}: {text!r}")
    return value
