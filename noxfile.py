"""Developer sessions: serve, cli, tests, lint, typecheck, protos (and bench).

python3 -m nox -s serve            # dev certs if missing, server on 127.0.0.1:50051
python3 -m nox -s cli -- list      # the CLI with the dev admin certificate
python3 -m nox -s tests            # the whole test suite (root for the cgroup tests)
python3 -m nox -s lint typecheck
"""

from __future__ import annotations

import hashlib
import subprocess
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]


def _pinned(tool: str) -> str:
    """The exact requirement for ``tool`` from pyproject's dev extra: pinned in one place."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev: list[str] = project["optional-dependencies"]["dev"]
    [requirement] = [r for r in dev if r.startswith(f"{tool}==")]
    return requirement


def _dev_install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session(reuse_venv=True)
def serve(session: nox.Session) -> None:
    """Run jobworker-server in the foreground on 127.0.0.1:50051 (Ctrl+C stops it cleanly)."""
    session.install("-e", ".")
    certs = ROOT / "certs"
    if not (certs / "server-cert.pem").exists():
        session.run("python", "scripts/gen-certs", str(certs))
    session.run(
        "jobworker-server",
        "--listen",
        "127.0.0.1:50051",
        "--certs-dir",
        str(certs),
        "--data-dir",
        str(ROOT / "var"),
        *session.posargs,
        # Ctrl+C reaches the server directly (same process group); nox must not follow up
        # with SIGTERM/SIGKILL after its default 0.3 s while jobs are being stopped.
        interrupt_timeout=30.0,
    )


def _install_once(session: nox.Session) -> None:
    """``pip install -e .`` unless this venv already has it from the same pyproject.toml.

    The install is editable, so code changes are live without it; only a change of
    pyproject.toml (dependencies, entry points) needs a new one. A recreated venv has no
    stamp and installs again.
    """
    stamp = Path(session.virtualenv.location) / ".jobworker-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    script = Path(session.bin) / "jobworker"
    if script.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return
    session.install("-e", ".")
    stamp.write_text(wanted)


@nox.session(reuse_venv=True)
def cli(session: nox.Session) -> None:
    """Run the jobworker CLI with the arguments after `--` (dev certs from certs/).

    nox itself exits with the CLI's exit status (see `jobworker --help`), not just 1.
    """
    _install_once(session)
    with subprocess.Popen([str(Path(session.bin) / "jobworker"), *session.posargs]) as proc:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl+C reached the CLI too: it ends itself (130)
                continue
    if code != 0:
        raise SystemExit(code)  # not a session failure: nox would turn every status into 1


@nox.session(reuse_venv=True)
def tests(session: nox.Session) -> None:
    """The whole test suite. As root on a cgroup host, the cgroup tests run too."""
    _dev_install(session)
    session.run("pytest", *session.posargs)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check (ruff at the version pinned in pyproject.toml)."""
    session.install(_pinned("ruff"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(reuse_venv=True)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the scripts (pinned in pyproject.toml)."""
    _dev_install(session)
    session.run("mypy")


@nox.session(reuse_venv=True)
def protos(session: nox.Session) -> None:
    """Regenerate jobworker/api/ from protos/worker.proto."""
    _dev_install(session)
    session.run("python", "scripts/gen_protos.py")


@nox.session(reuse_venv=True)
def bench(session: nox.Session) -> None:
    """Benchmarks against the physical floor and a grpc.aio reference (see docs/benchmarks.md)."""
    _dev_install(session)
    session.run("python", "scripts/bench.py", *session.posargs)
