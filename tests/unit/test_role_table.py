"""The role table against what the server actually dispatches: no RPC is served without a
rule, no rule names an RPC that is not served, and the default is deny."""

from __future__ import annotations

import pytest

from jobworker.errors import PermissionDenied
from jobworker.server.app import method_table
from jobworker.server.auth import ROLE_TABLE, authorize
from jobworker.server.health import Health
from jobworker.server.identity import Identity
from jobworker.server.service import JobService

ADMIN = Identity("a", "admin")
VIEWER = Identity("v", "viewer")
GUEST = Identity("g", "guest")
NO_OU = Identity("n", None)


async def test_every_served_rpc_has_a_rule_and_every_rule_is_served() -> None:
    table = method_table(JobService(manager=None), Health())  # type: ignore[arg-type]
    assert set(table) == set(ROLE_TABLE)


@pytest.mark.parametrize("identity", [ADMIN, VIEWER, GUEST, NO_OU])
@pytest.mark.parametrize("method", ["Check", "Watch", "List"])
def test_health_is_open_to_every_verified_certificate(identity: Identity, method: str) -> None:
    authorize(identity, "grpc.health.v1.Health", method)


@pytest.mark.parametrize(
    "service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
)
def test_reflection_is_for_admin_and_viewer(service: str) -> None:
    authorize(ADMIN, service, "ServerReflectionInfo")
    authorize(VIEWER, service, "ServerReflectionInfo")
    for identity in (GUEST, NO_OU):
        with pytest.raises(PermissionDenied, match="perform operation reflection"):
            authorize(identity, service, "ServerReflectionInfo")


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("job_worker.JobService", "NoSuch"),
        ("grpc.health.v1.Health", "NoSuch"),
        ("other.Service", "CreateJob"),  # a method name alone is not enough
        ("", "GetJob"),
    ],
)
def test_anything_not_in_the_table_is_denied_even_to_admin(service: str, method: str) -> None:
    with pytest.raises(PermissionDenied):
        authorize(ADMIN, service, method)


def test_delete_job_is_for_admin_only() -> None:
    authorize(ADMIN, "job_worker.JobService", "DeleteJob")
    for identity in (VIEWER, GUEST, NO_OU):
        with pytest.raises(PermissionDenied) as caught:
            authorize(identity, "job_worker.JobService", "DeleteJob")
        assert str(caught.value) == (
            f"role {identity.role_label} is not allowed to perform operation delete_job"
        )
