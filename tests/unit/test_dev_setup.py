"""The README's Quick start is what CI runs, through ./dev, which needs no system pip, nor
ensurepip (Debian and Ubuntu without python3-venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support import skip_unless

ROOT = Path(__file__).resolve().parents[2]
# python3 as Debian 12 and Ubuntu 24.04 have it without python3-venv: `-m venv` refuses to
# make an environment unless told --without-pip (its message is Debian's, shortened).
DEBIAN_PYTHON3 = """#!/bin/sh
case " $* " in
*" -m venv "*)
    case " $* " in
    *" --without-pip "*) ;;
    *) echo "The virtual environment was not created successfully because ensurepip is" \
            "not available." >&2
       exit 1 ;;
    esac ;;
esac
exec {python} "$@"
"""
NOXFILE = """import nox


@nox.session(venv_backend="none")
def hello(session):
    session.run("python", "-c", "print('hello from nox')", external=True)
"""


def test_ci_runs_the_quick_start_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    [test_command] = [
        line.split("#")[0].strip() for line in quick_start.splitlines() if " tests" in line
    ]
    assert test_command == "./dev tests"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_dev_installs_nox_into_its_own_venv_only() -> None:
    dev = ROOT / "dev"
    assert os.access(dev, os.X_OK)
    text = dev.read_text()
    assert "python3 -m venv .venv" in text
    assert "python3 -m venv --clear --without-pip .venv" in text
    assert ".venv/bin/python -m pip install" in text
    # no install into the system Python (PEP 668 refuses it)
    assert not re.search(r"^\s*(python3|pip3?) .*-m pip install", text, re.M)
    assert 'exec .venv/bin/nox -s "$@"' in text


def _index_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=10):
            return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.time_limit(180)
def test_dev_bootstraps_pip_from_the_index_where_ensurepip_is_missing(tmp_path: Path) -> None:
    skip_unless(_index_reachable(), "the package index is not reachable")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy2(ROOT / "dev", checkout / "dev")
    (checkout / "noxfile.py").write_text(NOXFILE)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python3 = fake_bin / "python3"
    real = Path(sys.base_prefix) / "bin" / "python3"  # not this venv's: a system python
    python3.write_text(DEBIAN_PYTHON3.format(python=real))
    python3.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)

    def dev(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(checkout / "dev"), *args],
            capture_output=True, text=True, env=env, timeout=150, check=False,
        )  # fmt: skip

    first = dev("hello")
    assert first.returncode == 0, first.stderr
    assert "ensurepip is not available" in first.stderr  # the fallback was taken
    assert "dev: python3 -m venv could not install pip (no ensurepip)" in first.stderr
    assert "hello from nox" in first.stdout
    venv = checkout / ".venv"
    assert os.access(venv / "bin" / "nox", os.X_OK)
    version = subprocess.run(
        [str(venv / "bin" / "nox"), "--version"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"\d{4}\.\d+\.\d+\S*", (version.stdout + version.stderr).strip())
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--version"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    assert str(venv) in pip.stdout  # pip lives in .venv itself
    # Once made, .venv is used as it is: no second bootstrap.
    again = dev("hello")
    assert again.returncode == 0, again.stderr
    assert "could not install pip" not in again.stderr
    assert "hello from nox" in again.stdout
