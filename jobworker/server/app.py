"""serve(): the server's root. Its nursery owns the signal watcher, the orphan reaper, the job
manager's nursery of jobs and the listener with one task per connection.

Shutdown (SIGINT/SIGTERM, see signals.py): stop accepting; every connection sends GOAWAY and
its RPCs end with UNAVAILABLE (streams included); after SHUTDOWN_DRAIN_S whatever is left is
cancelled; then the job manager stops every running job through the engine's stop path and
persists the records. Further signals do not cut this short: no job is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import trio

from jobworker.cgroups.detect import detect_controller
from jobworker.cgroups.reaper import Reaper
from jobworker.engine import open_job_manager
from jobworker.server.config import ServerConfig, StartupError
from jobworker.server.handler import ConnectionHandler
from jobworker.server.listener import Listener, format_address
from jobworker.server.logs import announce
from jobworker.server.sdnotify import notify
from jobworker.server.service import JobService
from jobworker.server.signals import open_server_signals, watch_signals
from jobworker.server.tls import CertificateError, build_server_context, server_certificate_expiry

log = logging.getLogger("jobworker.server")

SHUTDOWN_DRAIN_S = 3.0  # connections get this long to tell their clients before being cut
CGROUP_CLEANUP_S = 5.0  # bound on removing our (empty) cgroup subtree at shutdown
CGROUP_ROOT = "jobworker"  # job cgroups: <own cgroup>/jobworker/<instance>/<job id>


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
        controller = detect_controller(
            config.cgroups, pids_max=config.pids_max, root_name=instance_name(config.data_dir)
        )
        async with trio.open_nursery() as root:
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

            root.start_soon(
                functools.partial(watch_signals, reload=reload, debug=debug), signals, shutdown
            )
            reaper = Reaper()
            reaper.enable()
            await root.start(reaper.run)
            async with open_job_manager(
                config.data_dir,
                controller=controller,
                stop_grace=config.stop_grace,
                reaper=reaper,
                pids_max=config.pids_max,
            ) as manager:
                handler = ConnectionHandler(JobService(manager).methods(), config.limits)
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
                async with trio.open_nursery() as serving:
                    await serving.start(listener.serve)
                    host, port = listener.address
                    announce(f"listening on {format_address(host, port)}", "listening")
                    notify("READY=1", f"STATUS=listening on {format_address(host, port)}")
                    task_status.started((host, port))
                    await shutdown.wait()
                    notify("STOPPING=1", "STATUS=stopping jobs")
                    listener.shutdown()
                    serving.cancel_scope.deadline = trio.current_time() + SHUTDOWN_DRAIN_S
                log.info("connections closed; stopping jobs")
            with trio.move_on_after(CGROUP_CLEANUP_S, shield=True):
                await controller.remove_roots()  # every job has ended: our subtree is empty
            root.cancel_scope.cancel()  # the reaper and the signal watcher
    log.info("stopped")
