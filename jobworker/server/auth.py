"""THE role table: which role may call which RPC. Applied once, by the connection handler,
before any handler runs. Default deny: an RPC missing from the table, a certificate without
an OU, or an OU that is not a role here is allowed nothing.

Keyed by (service, method) as the gRPC path names them. Health is the one exception to
"a role is needed": a probe (a load balancer, systemd, Kubernetes) holds a certificate
from our CA but has no business holding a role, so any verified certificate may ask.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.errors import PermissionDenied
from jobworker.server.identity import Identity
from jobworker.wire.contract import SERVICE_NAME

ADMIN = "admin"
VIEWER = "viewer"
HEALTH_SERVICE = "grpc.health.v1.Health"  # the standard names (grpc/health/v1/health.proto)
REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


@dataclass(frozen=True)
class Rule:
    """The operation name used in messages and logs, and who may perform it.

    ``any_verified``: every certificate that chains to our CA, whatever its OU (health).
    ``quiet``: allowed calls are audited at DEBUG, not INFO (probes every few seconds
    would drown the audit log; a denied call is always a WARNING).
    """

    operation: str
    roles: frozenset[str]
    any_verified: bool = False
    quiet: bool = False


# job_worker.JobService: RPC method name (as in protos/worker.proto) -> rule. The spec's
# table, "Role-Based Authorization". A test fails if the generated service has an RPC that
# is not here.
JOB_SERVICE_RULES: dict[str, Rule] = {
    "CreateJob": Rule("create_job", frozenset({ADMIN})),
    "GetJob": Rule("get_job", frozenset({ADMIN, VIEWER})),
    "StopJob": Rule("stop_job", frozenset({ADMIN})),
    "GetJobs": Rule("list_jobs", frozenset({ADMIN, VIEWER})),
    "GetJobsStream": Rule("stream_job", frozenset({ADMIN, VIEWER})),
    "ListJobs": Rule("list_jobs", frozenset({ADMIN, VIEWER})),  # GetJobs, by pages
    "DeleteJob": Rule("delete_job", frozenset({ADMIN})),  # beyond the spec: as StopJob
}

_REFLECT = Rule("reflection", frozenset({ADMIN, VIEWER}))

ROLE_TABLE: dict[tuple[str, str], Rule] = {
    **{(SERVICE_NAME, method): rule for method, rule in JOB_SERVICE_RULES.items()},
    (HEALTH_SERVICE, "Check"): Rule("health_check", frozenset(), any_verified=True, quiet=True),
    (HEALTH_SERVICE, "Watch"): Rule("health_watch", frozenset(), any_verified=True, quiet=True),
    (HEALTH_SERVICE, "List"): Rule("health_list", frozenset(), any_verified=True, quiet=True),
    **{(service, "ServerReflectionInfo"): _REFLECT for service in REFLECTION_SERVICES},
}


def rule_for(service: str, method: str) -> Rule | None:
    """The rule for ``service/method``, None if there is none (nobody may call it)."""
    return ROLE_TABLE.get((service, method))


def operation_name(service: str, method: str) -> str:
    """The operation name for ``service/method`` (the method name itself if it has no rule)."""
    rule = rule_for(service, method)
    return rule.operation if rule is not None else method


def authorize(identity: Identity, service: str, method: str) -> None:
    """Raise PermissionDenied unless ``identity`` may call ``service/method``.

    The message is ``role <role> is not allowed to perform operation <op>``; a certificate
    without an OU shows as role ``none``.
    """
    rule = rule_for(service, method)
    if rule is not None and rule.any_verified:
        return  # the TLS handshake already verified the certificate against our CA
    if rule is None or identity.role is None or identity.role not in rule.roles:
        raise PermissionDenied(identity.role_label, operation_name(service, method))
