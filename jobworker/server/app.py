"""serve(): the server's root. Its nursery owns the signal watcher, the orphan reaper, the job
manager's nursery of jobs and the listener with one task per connection.

Shutdown (SIGINT/SIGTERM, see signals.py): health turns NOT_SERVING and CreateJob answers
UNAVAILABLE from then on; once Watch streams have been told (at most
NOT_SERVING_DELIVERY_S), stop accepting; every connection sends GOAWAY and its RPCs end with
UNAVAILABLE (streams included); after SHUTDOWN_DRAIN_S whatever is left is cancelled; then
the job manager stops every running job through the engine's stop path and persists the
records. Further signals do not cut this short: no job is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import trio
from anyio.streams.stapled import MultiListener
from prometheus_client import generate_latest

from jobworker.cgroups.base import ResourceController
from jobworker.cgroups.detect import detect_controller
from jobworker.engine import RunningLimits, open_job_manager
from jobworker.launch.isolation import IsolationUnusable, establish_isolation, parse_isolation
from jobworker.launch.launcher import Launcher, open_launcher
from jobworker.launch.reaper import Reaper
from jobworker.launch.request import Isolation
from jobworker.launch.users import JobUsers, UsersUnusable
from jobworker.server.config import ServerConfig, StartupError
from jobworker.server.handler import ConnectionHandler, MethodTable
from jobworker.server.health import Health
from jobworker.server.listener import Listener, format_address
from jobworker.server.logs import announce
from jobworker.server.metrics import ObservedManager, ServerMetrics, cgroups_label
from jobworker.server.metrics_http import open_metrics_server
from jobworker.server.ratelimit import RateLimiter
from jobworker.server.reflection import Reflection
from jobworker.server.sdnotify import notify
from jobworker.server.service import JobService
from jobworker.server.signals import open_server_signals, watch_signals
from jobworker.server.tls import CertificateError, build_server_context, server_certificate_expiry
from jobworker.wire.contract import SERVICE_NAME

log = logging.getLogger("jobworker.server")

SHUTDOWN_DRAIN_S = 3.0  # connections get this long to tell their clients before being cut
CGROUP_CLEANUP_S = 5.0  # bound on removing our (empty) cgroup subtree at shutdown
CGROUP_ROOT = "jobworker"  # job cgroups: <own cgroup>/jobworker/<instance>/<job id>


def method_table(jobs: JobService, health: Health) -> MethodTable:
    """Every RPC the server answers: the job service, health, and reflection of them all."""
    table: MethodTable = {(SERVICE_NAME, name): m for name, m in jobs.methods().items()}
    table.update(health.methods())
    table.update(Reflection(service for service, _ in table).methods())
    return table


async def _serve_metrics(
    nursery: trio.Nursery, address: tuple[str, int], metrics: ServerMetrics
) -> None:
    """Bind the metrics address, serve it from ``nursery``, print ``metrics on HOST:PORT``.
    Raises MetricsListenError."""
    registry = metrics.registry
    server = await open_metrics_server(*address, lambda: generate_latest(registry))
    nursery.start_soon(server.serve)
    announce(f"metrics on {format_address(*server.address)}", "metrics")


class ListenError(StartupError):
    """Raised when the --listen address cannot be bound (in use, not ours, unresolvable)."""


class DataDirBusy(StartupError):
    """Raised when another server already runs on the same --data-dir."""


class DataDirUnusable(StartupError):
    """Raised when the --data-dir cannot be created or its lock file not opened."""


def instance_name(data_dir: Path) -> str:
    """This server's own cgroup subtree name, derived from its data dir.

    Two servers on one host (each with its own data dir) get sibling subtrees
    ``<own>/jobworker/<instance>``: job ids cannot collide, and each start sweeps only the
    leftovers of a previous server on the *same* data dir.
    """
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()
    return f"{CGROUP_ROOT}/{digest[:12]}"


@contextlib.contextmanager
def lock_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<data-dir>/.lock`` while serving (DataDirBusy if taken,
    DataDirUnusable if the directory or the lock file cannot be made)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DataDirUnusable(f"cannot use data dir {data_dir}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirBusy(
                f"data dir {data_dir} is in use by another jobworker-server"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def count_tasks() -> int:
    """Every task of this Trio run (a cheap leak detector for tests and operators)."""
    total = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        total += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return total


async def _bind(config: ServerConfig) -> MultiListener[anyio.abc.SocketStream]:
    """Listen on --listen (ListenError if the address cannot be bound)."""
    try:
        return await anyio.create_tcp_listener(local_host=config.host, local_port=config.port)
    except OSError as exc:
        where = format_address(config.host, config.port)
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def _removing_roots(controller: ResourceController) -> AsyncIterator[None]:
    """Remove our job-cgroup subtree on the way out, however serving ended (by then every job
    has ended, so it is empty); shielded and bounded."""
    try:
        yield
    finally:
        with trio.move_on_after(CGROUP_CLEANUP_S, shield=True):
            await controller.remove_roots()


def describe_sandbox(isolation: Isolation, users: JobUsers) -> str:
    """What every job is isolated by and runs as, in one phrase: the start line, and the
    ``would enforce`` line of ``--check``."""
    return f"job isolation: {isolation.describe()}; {users.describe()}"


async def _job_sandbox(config: ServerConfig, launcher: Launcher) -> tuple[Isolation, JobUsers]:
    """What every job will be isolated by and run as; logged in one line. Raises
    StartupError when an explicit setting cannot be honoured here."""
    try:
        users = JobUsers.from_settings(config.job_user, config.job_uid_range)
        isolation = await establish_isolation(
            launcher, parse_isolation(config.isolation), str(config.data_dir.resolve())
        )
    except (IsolationUnusable, UsersUnusable) as exc:
        raise StartupError(str(exc)) from None
    log.info("%s", describe_sandbox(isolation, users))
    return isolation, users


async def serve(
    config: ServerConfig,
    ssl_context: ssl.SSLContext,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until SIGINT/SIGTERM, then shut down gracefully and return.

    ``task_status.started((host, port))`` fires once connections are accepted (after the
    ``listening on HOST:PORT`` line). Raises DataDirBusy (another server on the data dir),
    CgroupsUnavailable (--cgroups require) and ListenError (cannot bind) before that.
    """
    listener_box: list[Listener] = []
    with (
        lock_data_dir(config.data_dir),
        open_server_signals() as signals,
    ):
        # Bound before any cgroup is made: an address in use leaves nothing behind.
        tcp = await _bind(config)
        try:
            controller = detect_controller(
                config.cgroups, pids_max=config.pids_max, root_name=instance_name(config.data_dir)
            )
        except BaseException:
            await anyio.aclose_forcefully(tcp)
            raise
        async with tcp, _removing_roots(controller), trio.open_nursery() as root:
            shutdown = trio.Event()

            def debug() -> str:
                connections = listener_box[0].connections if listener_box else 0
                return f"tasks={count_tasks()} connections={connections}"

            def reload() -> None:
                try:
                    context = build_server_context(config.certs_dir)
                    expiry = server_certificate_expiry(config.certs_dir)
                except CertificateError as exc:
                    log.error("certificates not reloaded, the current ones stay: %s", exc)  # noqa: TRY400 (one line, no traceback)
                    return
                for listener in listener_box:
                    listener.replace_ssl_context(context)
                log.info(
                    "certificates reloaded from %s for new connections; the server "
                    "certificate expires %s",
                    config.certs_dir,
                    f"{expiry:%Y-%m-%dT%H:%M:%SZ}",
                )

            def shutting_down() -> None:
                if not listener_box:
                    root.cancel_scope.cancel()  # still starting (loading records): nothing to drain

            root.start_soon(
                functools.partial(
                    watch_signals, reload=reload, debug=debug, on_shutdown=shutting_down
                ),
                signals,
                shutdown,
            )
            reaper = Reaper()
            reaper.enable()
            await root.start(reaper.run)
            async with open_launcher(root, reaper=reaper) as launcher:
                isolation, users = await _job_sandbox(config, launcher)
                async with open_job_manager(
                    config.data_dir,
                    controller=controller,
                    stop_grace=config.stop_grace,
                    launcher=launcher,
                    isolation=isolation,
                    users=users,
                    hidden=[config.certs_dir.resolve()],
                    pids_max=config.pids_max,
                    min_free_disk=config.min_free_disk,
                    default_timeout=config.default_job_timeout,
                    max_timeout=config.max_job_timeout,
                    running_limits=RunningLimits(
                        config.max_running_jobs, config.max_running_jobs_per_client
                    ),
                    role_ceilings=None
                    if config.role_limits is None
                    else config.role_limits.by_role(),
                    retention=config.retention,
                    retention_interval=config.retention_interval,
                    max_output_bytes=config.max_output_bytes,
                ) as manager:
                    health = Health()
                    metrics = (  # without --metrics-listen nothing is counted: no cost per RPC
                        ServerMetrics(
                            cgroups=cgroups_label(controller),
                            isolation=",".join(isolation.names) or "none",
                        )
                        if config.metrics_listen is not None
                        else None
                    )
                    served = (
                        manager
                        if metrics is None
                        else ObservedManager(manager, metrics).as_manager()
                    )
                    service = JobService(served, max_message_bytes=config.limits.max_message_bytes)
                    # Deleted by DeleteJob or by retention: what remembers the job forgets it.
                    manager.watch_deletes(service.job_deleted)
                    if metrics is not None:
                        manager.watch_deletes(metrics.job_deleted)
                    handler = ConnectionHandler(
                        method_table(service, health),
                        config.limits,
                        None if metrics is None else metrics.observe_rpc,
                        rate_limiter=None
                        if config.rate_limit is None
                        else RateLimiter(config.rate_limit),
                    )
                    sockets = [s for s in tcp.listeners if isinstance(s, anyio.abc.SocketListener)]
                    listener = Listener(
                        sockets,
                        ssl_context,
                        handler,
                        handshake_timeout=config.handshake_timeout,
                        max_connections=config.max_connections,
                    )
                    listener_box.append(listener)
                    if metrics is not None and config.metrics_listen is not None:
                        metrics.watch_state(manager, listener)
                        await _serve_metrics(root, config.metrics_listen, metrics)
                    async with trio.open_nursery() as serving:
                        await serving.start(listener.serve)
                        host, port = listener.address
                        health.set_serving()
                        announce(f"listening on {format_address(host, port)}", "listening")
                        notify("READY=1", f"STATUS=listening on {format_address(host, port)}")
                        task_status.started((host, port))
                        await shutdown.wait()
                        notify("STOPPING=1", "STATUS=stopping jobs")
                        # No checkpoint between these two: no job starts once health says
                        # NOT_SERVING, while watchers are being told (before GOAWAY).
                        service.refuse_new_jobs()
                        await health.shut_down()
                        listener.shutdown()
                        serving.cancel_scope.deadline = trio.current_time() + SHUTDOWN_DRAIN_S
                    log.info("connections closed; stopping jobs")
            root.cancel_scope.cancel()  # the reaper and the signal watcher
        # After the root nursery, so that a start-up cut short by a signal removes it too.
        with trio.move_on_after(CGROUP_CLEANUP_S, shield=True):
            await controller.remove_roots()  # every job has ended: our subtree is empty
    log.info("stopped")
