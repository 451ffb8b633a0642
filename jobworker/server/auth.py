"""THE role table: which role may call which RPC. Applied once, by the connection handler,
before any handler runs. Default deny: an RPC missing from the table, a certificate without
an OU, or an OU that is not a role here is allowed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.errors import PermissionDenied
from jobworker.server.identity import Identity

ADMIN = "admin"
VIEWER = "viewer"


@dataclass(frozen=True)
class Rule:
    """The operation name used in messages and logs, and the roles allowed to perform it."""

    operation: str
    roles: frozenset[str]


# RPC method name (as in protos/worker.proto) -> rule. The spec's table, "Role-Based
# Authorization", plus our additions. A test fails if the generated service has an RPC that
# is not here.
ROLE_TABLE: dict[str, Rule] = {
    "CreateJob": Rule("create_job", frozenset({ADMIN})),
    "GetJob": Rule("get_job", frozenset({ADMIN, VIEWER})),
    "StopJob": Rule("stop_job", frozenset({ADMIN})),
    "GetJobs": Rule("list_jobs", frozenset({ADMIN, VIEWER})),
    "GetJobsStream": Rule("stream_job", frozenset({ADMIN, VIEWER})),
    "ListJobs": Rule("list_jobs", frozenset({ADMIN, VIEWER})),  # GetJobs, by pages
}


def operation_name(method: str) -> str:
    """The operation name for ``method`` (the method name itself if it is not in the table)."""
    rule = ROLE_TABLE.get(method)
    return rule.operation if rule is not None else method


def authorize(identity: Identity, method: str) -> None:
    """Raise PermissionDenied unless ``identity``'s role may call ``method``.

    The message is ``role <role> is not allowed to perform operation <op>``; a certificate
    without an OU shows as role ``none``.
    """
    rule = ROLE_TABLE.get(method)
    if rule is None or identity.role is None or identity.role not in rule.roles:
        raise PermissionDenied(identity.role_label, operation_name(method))
