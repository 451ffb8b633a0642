"""``nox -s cli``: the CLI's exit status comes through, and an unchanged venv is not reinstalled.

Runs the real nox on the repository's noxfile with its default venv (``.nox/cli``, the one a
developer's ``nox -s cli`` uses): the first run in a fresh checkout creates it (slow, once).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOX_TIMEOUT_S = 600.0  # a first run creates the venv and installs the package


def nox_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nox", "-s", "cli", "--", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=NOX_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def installed() -> None:
    """The venv exists and has the package (whatever this first run had to do)."""
    first = nox_cli("--version")
    assert first.returncode == 0, first.stdout + first.stderr


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--version"], 0, ""),
        (["bogus"], 2, "(see 'jobworker --help')"),
        (["--cert=/nonexistent/c.pem", "--server=127.0.0.1:1", "list"], 3, "missing certificate"),
    ],
)
def test_the_cli_exit_status_passes_through_without_a_reinstall(
    argv: list[str], code: int, message: str
) -> None:
    run = nox_cli(*argv)
    assert run.returncode == code, run.stdout + run.stderr
    assert message in run.stderr
    assert "pip install" not in run.stdout + run.stderr  # nothing changed since the install
