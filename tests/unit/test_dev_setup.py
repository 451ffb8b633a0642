"""The README's Quick start is what CI runs, through ./dev, which needs no system pip."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    assert ".venv/bin/python -m pip install" in text
    # no install into the system Python (PEP 668 refuses it)
    assert not re.search(r"^\s*(python3|pip3?) .*-m pip install", text, re.M)
    assert 'exec .venv/bin/nox -s "$@"' in text
