"""Where each server setting comes from: a flag, then ``JOB_WORKER_<FLAG>`` in the
environment, then the ``--config`` TOML file, then the default.

The argparse parser is the one list of settings: every long option that is not a meta option
(``--config``, ``--print-config``, ``--check``, ``--help``) is a setting, its TOML key is the
flag without the dashes (``max-connections``) and its environment variable the key
upper-cased with underscores (``JOB_WORKER_MAX_CONNECTIONS``). Every source goes through
the flag's own ``type`` and ``choices``, so a value is valid in a file exactly when it is
valid on the command line. Environment variables with the prefix that name no setting are
ignored: the client CLI reads ``JOB_WORKER_SERVER`` and ``JOB_WORKER_CERT_PATH`` from the
same shells.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobworker.server.config import StartupError

ENV_PREFIX = "JOB_WORKER_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"  # the config file, when --config is not given
META_DESTS = frozenset({"help", "config", "print_config", "check"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(StartupError):
    """A setting with a bad value, an unknown key, an unreadable file: one line naming it."""


@dataclass(frozen=True)
class Setting:
    """One configurable flag."""

    action: argparse.Action

    @property
    def flag(self) -> str:
        return next(o for o in self.action.option_strings if o.startswith("--"))

    @property
    def key(self) -> str:
        return self.flag[2:]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def is_switch(self) -> bool:
        return self.action.nargs == 0

    def convert(self, text: str) -> Any:
        """``text`` as the flag would parse it; ValueError with the reason if it would not."""
        if self.is_switch:
            word = text.strip().lower()
            if word in _TRUE | _FALSE:
                return word in _TRUE
            raise ValueError(f"expected true or false, got {text!r}")
        convert = self.action.type or str
        try:
            value = convert(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ValueError(str(exc) or f"invalid value {text!r}") from None
        choices = self.action.choices
        if choices is not None and value not in choices:
            raise ValueError(
                f"invalid choice {text!r} (choose from {', '.join(map(str, choices))})"
            )
        return value


def settings_of(parser: argparse.ArgumentParser) -> list[Setting]:
    """Every configurable setting of ``parser``, in the order of its flags."""
    return [
        Setting(action)
        for action in parser._actions
        if action.dest not in META_DESTS and any(o.startswith("--") for o in action.option_strings)
    ]


@dataclass(frozen=True)
class Resolved:
    """The effective settings (``args``, as argparse would give them, meta options included)
    and, per setting dest, where its value came from."""

    args: argparse.Namespace
    sources: dict[str, str]
    settings: list[Setting]


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Only the flags given in ``argv`` (defaults suppressed)."""
    parser.parse_args(argv)  # --help and usage errors, with the defaults shown
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return parser.parse_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


def _from_file(value: object, setting: Setting, base: Path) -> Any:
    if setting.is_switch:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string or a number, got {json.dumps(value, default=str)}")  # noqa: TRY004 (reported as a bad value)
    converted = setting.convert(str(value))
    if isinstance(converted, Path) and not converted.is_absolute():
        converted = base / converted  # relative to the file, not to wherever the server starts
    return converted


def load_file(path: Path, by_key: Mapping[str, Setting]) -> dict[str, Any]:
    """dest -> value for every key of the TOML file at ``path``; ConfigError naming the key."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        setting = by_key.get(key)
        if setting is None:
            close = difflib.get_close_matches(key.replace("_", "-"), by_key, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
        try:
            values[setting.dest] = _from_file(value, setting, path.parent)
        except ValueError as exc:
            raise ConfigError(f"config file {path}: {key}: {exc}") from None
    return values


def resolve(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]
) -> Resolved:
    """Flags > environment > file > default. Bad flags exit through ``parser.error``; every
    other problem raises ConfigError."""
    explicit = _explicit(parser, argv)
    settings = settings_of(parser)
    defaults = parser.parse_args([])  # argparse converts string defaults through `type`
    args = argparse.Namespace(**vars(defaults))
    sources = {s.dest: "default" for s in settings}

    config_path: Path | None = getattr(explicit, "config", None)
    if config_path is None and environ.get(CONFIG_ENV):
        config_path = Path(environ[CONFIG_ENV])
    args.config = config_path
    if config_path is not None:
        for dest, value in load_file(config_path, {s.key: s for s in settings}).items():
            setattr(args, dest, value)
            sources[dest] = f"file {config_path}"
    for setting in settings:
        if setting.env in environ:
            try:
                value = setting.convert(environ[setting.env])
            except ValueError as exc:
                raise ConfigError(f"environment {setting.env}: {exc}") from None
            setattr(args, setting.dest, value)
            sources[setting.dest] = f"environment {setting.env}"
    for dest, value in vars(explicit).items():
        setattr(args, dest, value)
        if dest in sources:
            sources[dest] = f"flag {next(s.flag for s in settings if s.dest == dest)}"
    return Resolved(args, sources, settings)


def toml_value(value: object) -> str:
    """``value`` as a TOML literal that the setting's own ``type`` reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def render(resolved: Resolved) -> str:
    """The effective configuration as TOML, each value's source as a comment."""
    lines = [
        "# jobworker-server: effective configuration",
        "# (precedence: flag > environment JOB_WORKER_<FLAG> > config file > default)",
    ]
    for setting in resolved.settings:
        value = getattr(resolved.args, setting.dest)
        if isinstance(value, Path):
            value = value.absolute()  # the same place whatever directory reads it back
        source = resolved.sources[setting.dest]
        if value is None:  # unset (the server derives it, or the feature is off)
            lines.append(f"# {setting.key} is not set  # {source}")
            continue
        lines.append(f"{setting.key} = {toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"
