"""README examples that must stay true: run as written, they give what the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
UNIT = ROOT / "deploy" / "jobworker.service"


def section(title: str) -> str:
    """The README's text from ``title`` to the next heading of any level (a ``#`` line inside
    a code block is none)."""
    lines = README.split(f"\n{title}\n", 1)[1].splitlines(keepends=True)
    taken, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            break
        taken.append(line)
    return "".join(taken)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_print_config_example_prints_what_the_readme_shows(tmp_path: Path) -> None:
    text = section("### Configuration file and environment")
    [script] = [b for b in blocks(text, "bash") if "--print-config" in b]
    [shown] = blocks(text, "toml")
    # The example works in /tmp: run it in a directory of our own instead.
    script = script.replace("/tmp", str(tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_WORKER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # jobworker-server
    result = subprocess.run(
        ["sh", "-e", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown.replace("/tmp", str(tmp_path))


def test_the_units_documentation_is_installed_by_the_install_steps() -> None:
    [documentation] = [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith("Documentation=")
    ]
    assert documentation.startswith("file://")
    path = documentation.removeprefix("file://")
    [steps] = [
        b
        for b in blocks(section("### Installing as a service (systemd)"), "bash")
        if "systemctl enable" in b
    ]
    [install] = [line for line in steps.splitlines() if f" {path} " in f"{line} "]
    # It copies the README there, before the unit is enabled.
    assert re.match(rf"sudo install -D -m 0644 README\.md {re.escape(path)}\b", install)
    lines = steps.splitlines()
    assert lines.index(install) < next(i for i, line in enumerate(lines) if "enable" in line)
