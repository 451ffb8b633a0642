"""serve(): the server's root. Its nursery owns the signal watcher, the orphan reaper, the job
manager's nursery of jobs and the listener with one task per connection.

Shutdown (first SIGINT/SIGTERM): stop accepting; every connection sends GOAWAY and its RPCs
end with UNAVAILABLE (streams included); after SHUTDOWN_DRAIN_S whatever is left is
cancelled; then the job manager stops every running job through the engine's stop path and
persists the records. A second signal exits at once (jobs left running are swept by the
next start).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import trio
from prometheus_client import generate_latest

from jobworker.cgroups.detect import detect_controller
from jobworker.cgroups.reaper import Reaper
from jobworker.engine import open_job_manager
from jobworker.server.config import ServerConfig
from jobworker.server.handler import ConnectionHandler, MethodTable
from jobworker.server.health import Health
from jobworker.server.listener import Listener, format_address
from jobworker.server.metrics import (
    ObservedManager,
    ServerMetrics,
    cgroups_label,
    file_system_now,
)
from jobworker.server.metrics_http import open_metrics_server
from jobworker.server.reflection import Reflection
from jobworker.server.service import SERVICE_NAME, JobService

log = logging.getLogger("jobworker.server")

SHUTDOWN_DRAIN_S = 3.0  # connections get this long to tell their clients before being cut
FORCED_EXIT_CODE = 130  # second signal: exit without cleanup (like an interrupted shell)
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEBUG_SIGNAL = signal.SIGUSR1  # logs task and connection counts (used by the tests)
CGROUP_CLEANUP_S = 5.0  # bound on removing our (empty) cgroup subtree at shutdown
CGROUP_ROOT = "jobworker"  # job cgroups: <own cgroup>/jobworker/<instance>/<job id>
ISOLATION = "none"  # jobs share the host's namespaces (reported in jobworker_info)


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
    print(f"metrics on {format_address(*server.address)}", file=sys.stderr, flush=True)


class ListenError(Exception):
    """Raised when the --listen address cannot be bound (in use, not ours, unresolvable)."""


class DataDirBusy(Exception):
    """Raised when another server already runs on the same --data-dir."""


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
    """Hold an exclusive lock on ``<data-dir>/.lock`` while serving (DataDirBusy if taken)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


async def _watch_signals(
    signals: AsyncIterator[int],
    shutdown: trio.Event,
    listener_box: list[Listener],
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == DEBUG_SIGNAL:
            connections = listener_box[0].connections if listener_box else 0
            log.info("debug: tasks=%d connections=%d", count_tasks(), connections)
        elif not shutdown.is_set():
            log.info("%s received: shutting down (a second signal forces exit)", name)
            shutdown.set()
        else:
            log.warning("%s received again: exiting now, without cleanup", name)
            logging.shutdown()
            os._exit(FORCED_EXIT_CODE)


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
        trio.open_signal_receiver(*SHUTDOWN_SIGNALS, DEBUG_SIGNAL) as signals,
    ):
        controller = detect_controller(
            config.cgroups, pids_max=config.pids_max, root_name=instance_name(config.data_dir)
        )
        async with trio.open_nursery() as root:
            shutdown = trio.Event()
            root.start_soon(_watch_signals, signals, shutdown, listener_box)
            reaper = Reaper()
            reaper.enable()
            await root.start(reaper.run)
            # Records marked LOST from here on are this start's (see metrics.lost_since).
            loading_since = file_system_now(config.data_dir) if config.metrics_listen else 0.0
            async with open_job_manager(
                config.data_dir,
                controller=controller,
                stop_grace=config.stop_grace,
                reaper=reaper,
                pids_max=config.pids_max,
            ) as manager:
                health = Health()
                metrics = (  # without --metrics-listen nothing is counted: no cost per RPC
                    ServerMetrics(cgroups=cgroups_label(controller), isolation=ISOLATION)
                    if config.metrics_listen is not None
                    else None
                )
                served = (
                    manager if metrics is None else ObservedManager(manager, metrics).as_manager()
                )
                handler = ConnectionHandler(
                    method_table(JobService(served), health),
                    config.limits,
                    None if metrics is None else metrics.observe_rpc,
                )
                try:
                    tcp = await anyio.create_tcp_listener(
                        local_host=config.host, local_port=config.port
                    )
                except OSError as exc:
                    where = format_address(config.host, config.port)
                    raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
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
                    metrics.watch_state(
                        manager, listener, data_dir=config.data_dir, since=loading_since
                    )
                    await _serve_metrics(root, config.metrics_listen, metrics)
                async with trio.open_nursery() as serving:
                    await serving.start(listener.serve)
                    host, port = listener.address
                    health.set_serving()
                    print(f"listening on {format_address(host, port)}", file=sys.stderr, flush=True)
                    task_status.started((host, port))
                    await shutdown.wait()
                    await health.shut_down()  # watchers hear NOT_SERVING before GOAWAY
                    listener.shutdown()
                    serving.cancel_scope.deadline = trio.current_time() + SHUTDOWN_DRAIN_S
                log.info("connections closed; stopping jobs")
            with trio.move_on_after(CGROUP_CLEANUP_S, shield=True):
                await controller.remove_roots()  # every job has ended: our subtree is empty
            root.cancel_scope.cancel()  # the reaper and the signal watcher
    log.info("stopped")
