"""Pins that must not drift: the lint and type-check tools exactly, in one place (the dev
extra of pyproject.toml, which the nox sessions read), and the fragile runtime dependencies
with the reason for their pin beside them."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import noxfile

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# A requirement of ruff or mypy with any version operator.
VERSIONED = re.compile(r"\b(ruff|mypy)\s*(===|==|~=|>=|<=|!=|<|>)\s*\d")


def dev_extra() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extra: list[str] = project["optional-dependencies"]["dev"]
    return extra


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    return [ROOT / name.decode() for name in names if name]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_the_tool_is_pinned_exactly_in_the_dev_extra(tool: str) -> None:
    [requirement] = [r for r in dev_extra() if re.match(rf"{tool}\b", r)]
    assert re.fullmatch(rf"{tool}==\d+(\.\d+)+", requirement), requirement
    # The lint session installs that requirement itself (the typecheck session the extra).
    assert noxfile._pinned(tool) == requirement


def test_no_other_file_names_a_version_of_ruff_or_mypy() -> None:
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if VERSIONED.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert sorted(found) == sorted(
        f"pyproject.toml:{number}: {line.strip()}"
        for number, line in enumerate(PYPROJECT.read_text().splitlines(), 1)
        if line.strip().strip('",') in {noxfile._pinned("ruff"), noxfile._pinned("mypy")}
    )
    assert len(found) == 2


@pytest.mark.parametrize("package", ["purerpc", "h2"])
def test_a_fragile_dependency_is_pinned_with_its_reason_above_it(package: str) -> None:
    lines = PYPROJECT.read_text().splitlines()
    [index] = [i for i, line in enumerate(lines) if line.strip().startswith(f'"{package}==')]
    comment: list[str] = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#"):
            break
        comment.insert(0, line.strip().lstrip("# "))
    reason = " ".join(comment)
    assert reason, f"no comment above the {package} pin"
    assert package in reason  # it says why this package, not some other line's story
    assert len(reason.split()) >= 8, reason  # a reason, not a label
