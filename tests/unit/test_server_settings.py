"""Server settings: flag > environment > file > default, one parser as the list of keys."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from jobworker.server.main import build_parser, config_from_args
from jobworker.server.settings import ConfigError, render, resolve, settings_of, toml_value

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "server.toml"


def _resolve(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return resolve(build_parser(), argv, env or {})


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("pids-max = 10\nstop-grace = 0.5\nmax-connections = 7\n")
    env = {"JOB_WORKER_PIDS_MAX": "20", "JOB_WORKER_STOP_GRACE": "0.7"}
    resolved = _resolve(["--config", str(config), "--pids-max", "30"], env)
    args = resolved.args
    assert (args.pids_max, args.stop_grace, args.max_connections) == (30, 0.7, 7)
    assert args.idle_timeout == 300.0
    assert resolved.sources["pids_max"] == "flag --pids-max"
    assert resolved.sources["stop_grace"] == "environment JOB_WORKER_STOP_GRACE"
    assert resolved.sources["max_connections"] == f"file {config}"
    assert resolved.sources["idle_timeout"] == "default"


def test_the_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('listen = "[::1]:7000"\ncgroups = "off"\n')
    args = _resolve([], {"JOB_WORKER_CONFIG": str(config)}).args
    built = config_from_args(args)
    assert (built.host, built.port, built.cgroups) == ("::1", 7000, "off")


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "server.toml"
    config.parent.mkdir()
    config.write_text('data-dir = "state"\ncerts-dir = "/abs/certs"\n')
    args = _resolve(["--config", str(config)]).args
    assert args.data_dir == config.parent / "state"
    assert args.certs_dir == Path("/abs/certs")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo = 1\n", "unknown key 'foo'"),
        (
            "max_connections = 1\n",
            "unknown key 'max_connections' (did you mean 'max-connections'?)",
        ),
        ("pids-max = 0\n", "pids-max: must be >= 1: '0'"),
        ("pids-max = 2.5\n", "pids-max: not an integer: '2.5'"),
        ("pids-max = true\n", "pids-max: expected a string or a number, got true"),
        ('cgroups = "maybe"\n', "cgroups: invalid choice 'maybe' (choose from auto, require, off)"),
        ('listen = "nohost"\n', "listen: expected HOST:PORT"),
        ("[server]\nlisten = 1\n", "unknown key 'server'"),
        ("listen = \n", "is not valid TOML"),
    ],
)
def test_a_bad_file_is_one_error_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "server.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        _resolve(["--config", str(config)])
    assert str(caught.value).startswith(f"config file {config}")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read config file .*: No such file"):
        _resolve(["--config", str(tmp_path / "nope.toml")])


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("JOB_WORKER_MAX_CONNECTIONS", "many", "not an integer: 'many'"),
        (
            "JOB_WORKER_LOG_LEVEL",
            "loud",
            "invalid choice 'loud' (choose from DEBUG, INFO, WARNING, ERROR)",
        ),
        ("JOB_WORKER_IDLE_TIMEOUT", "-1", "must be > 0"),
    ],
)
def test_a_bad_environment_value_is_one_error_naming_the_variable(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _resolve([], {name: value})
    assert str(caught.value).startswith(f"environment {name}: ")
    assert message in str(caught.value)


def test_environment_variables_of_the_client_are_ignored() -> None:
    env = {"JOB_WORKER_SERVER": "x:1", "JOB_WORKER_CERT_PATH": "/nowhere"}
    assert set(_resolve([], env).sources.values()) == {"default"}


def test_every_flag_is_settable_by_file_and_environment(tmp_path: Path) -> None:
    """Each setting read back from the --print-config of non-default values: from a file,
    and from the environment, it comes out the same."""
    parser = build_parser()
    defaults = _resolve([]).args
    changed: dict[str, str] = {}
    # Text settings with a grammar of their own: a valid value other than the default.
    samples = {
        "isolation": "pid,net",
        "job-user": "nobody",
        "job-uid-range": "3000000-3000099",
        "role-limits": "admin:cpu=200,timeout=60;viewer:memory=64",
        "rate-limit": "2.5/s,7",
    }
    for setting in settings_of(parser):
        value = getattr(defaults, setting.dest)
        if setting.key in samples:
            changed[setting.key] = toml_value(samples[setting.key])
        elif setting.action.choices:
            other = next(c for c in setting.action.choices if c != value)
            changed[setting.key] = toml_value(other)
        elif isinstance(value, Path):
            changed[setting.key] = toml_value(f"/x/{setting.key}")
        elif isinstance(value, tuple) or (value is None and setting.action.metavar == "HOST:PORT"):
            changed[setting.key] = toml_value("127.0.0.2:1234")
        elif value is None:  # an unset number (the server derives its value)
            changed[setting.key] = toml_value(12345)
        else:
            changed[setting.key] = toml_value(value * 2)
    config = tmp_path / "server.toml"
    config.write_text("".join(f"{k} = {v}\n" for k, v in changed.items()))
    from_file = _resolve(["--config", str(config)])
    assert set(from_file.sources.values()) == {f"file {config}"}
    env = {s.env: str(tomllib.loads(f"v = {changed[s.key]}")["v"]) for s in settings_of(parser)}
    from_env = _resolve([], env)
    assert all(v.startswith("environment ") for v in from_env.sources.values())
    assert vars(from_env.args) | {"config": None} == vars(from_file.args) | {"config": None}
    assert vars(from_file.args) != vars(defaults) | {"config": config}


def test_print_config_is_toml_that_reads_back_to_the_same_settings(tmp_path: Path) -> None:
    resolved = _resolve(["--pids-max", "9", "--listen", "[::1]:0"], {"JOB_WORKER_CGROUPS": "off"})
    text = render(resolved)
    data = tomllib.loads(text)
    unset = {s.key for s in resolved.settings if getattr(resolved.args, s.dest) is None}
    assert unset == {
        "min-free-disk",
        "metrics-listen",
        "job-user",
        "default-job-timeout",
        "max-job-timeout",
        "max-running-jobs",
        "max-running-jobs-per-client",
        "role-limits",
        "rate-limit",
        "retain-finished",
        "retain-finished-count",
        "max-output-bytes",
    }
    assert set(data) == {s.key for s in resolved.settings} - unset
    assert re.search(r"^# metrics-listen is not set  # default$", text, re.M)
    assert re.search(r"^pids-max = 9  # flag --pids-max$", text, re.M)
    assert re.search(r'^cgroups = "off"  # environment JOB_WORKER_CGROUPS$', text, re.M)
    assert re.search(r"^idle-timeout = 300.0  # default$", text, re.M)
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    again = render(_resolve(["--config", str(printed)], {}))

    def values(toml: str) -> list[str]:
        return [line.split("  # ")[0] for line in toml.splitlines() if not line.startswith("#")]

    assert values(again) == values(text)


def test_the_example_file_lists_every_setting_with_its_default() -> None:
    """deploy/server.toml cannot go stale: its keys are the parser's settings, in order, each
    under a comment that ends with the setting's real default; and it loads cleanly."""
    parser = build_parser()
    defaults = _resolve([]).args
    lines = EXAMPLE.read_text().splitlines()
    # A setting that is unset by default is shown commented out, with an example value.
    keys = [m.group(1) for line in lines if (m := re.match(r"^(?:# )?([a-z-]+) = ", line))]
    assert keys == [s.key for s in settings_of(parser)]
    for setting in settings_of(parser):
        value = getattr(defaults, setting.dest)
        prefix = f"# {setting.key} = " if value is None else f"{setting.key} = "
        [index] = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        comment = lines[index - 1]
        assert comment.startswith("# "), setting.key
        default = "unset" if value is None else toml_value(value)
        assert comment.endswith(f" default: {default}"), (setting.key, comment, default)
    loaded = _resolve(["--config", str(EXAMPLE)])
    unset = {s.dest for s in settings_of(parser) if getattr(defaults, s.dest) is None}
    assert {v for k, v in loaded.sources.items() if k not in unset} == {f"file {EXAMPLE}"}


def test_job_timeouts_are_whole_seconds_and_the_default_within_the_maximum(
    tmp_path: Path,
) -> None:
    args = _resolve(["--default-job-timeout", "30"], {"JOB_WORKER_MAX_JOB_TIMEOUT": "60"}).args
    built = config_from_args(args)
    assert (built.default_job_timeout, built.max_job_timeout) == (30, 60)
    unset = config_from_args(_resolve([]).args)
    assert (unset.default_job_timeout, unset.max_job_timeout) == (None, None)
    config = tmp_path / "server.toml"
    config.write_text("max-job-timeout = 0\n")
    with pytest.raises(ConfigError, match=r"max-job-timeout: must be >= 1: '0'$"):
        _resolve(["--config", str(config)])
    with pytest.raises(ConfigError, match=r"not an integer: '1.5'$"):
        _resolve([], {"JOB_WORKER_DEFAULT_JOB_TIMEOUT": "1.5"})
    above = _resolve(["--default-job-timeout", "61", "--max-job-timeout", "60"]).args
    with pytest.raises(ConfigError) as caught:
        config_from_args(above)
    assert str(caught.value) == "default-job-timeout (61 s) is above max-job-timeout (60 s)"


def test_role_limits_read_back_and_reach_the_config(tmp_path: Path) -> None:
    text = "admin: cpu=400, memory=8192 ;viewer:timeout=600,iobps=1000"
    config = tmp_path / "server.toml"
    config.write_text(f'role-limits = "{text}"\n')
    built = config_from_args(_resolve(["--config", str(config)]).args)
    assert built.role_limits is not None
    by_role = built.role_limits.by_role()
    assert (by_role["admin"].cpu_percent, by_role["admin"].memory_mb) == (400, 8192)
    assert (by_role["admin"].io_bps, by_role["admin"].timeout_s) == (None, None)
    assert (by_role["viewer"].timeout_s, by_role["viewer"].io_bps) == (600, 1000)
    assert str(built.role_limits) == "admin:cpu=400,memory=8192;viewer:iobps=1000,timeout=600"
    flag = _resolve(["--role-limits", str(built.role_limits)]).args.role_limits
    assert flag == built.role_limits
    assert config_from_args(_resolve([]).args).role_limits is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("admin", "expected ROLE:KEY=N[,KEY=N...] (e.g. admin:cpu=400,memory=8192), got 'admin'"),
        ("admn:cpu=1", "unknown role 'admn' (roles: admin, viewer)"),
        ("admin:cpu=1;admin:memory=2", "role 'admin' is given twice"),
        ("admin:disk=1", "admin: unknown limit 'disk' (limits: cpu, memory, iobps, timeout)"),
        ("admin:cpu=1,cpu=2", "admin: cpu is given twice"),
        ("admin:cpu=0", "admin: cpu: must be >= 1: '0'"),
        ("admin:memory=lots", "admin: memory: not an integer: 'lots'"),
        ("admin:timeout=9999999999", "admin: timeout: must be <= 2147483647"),
        ("admin:", "admin: no limit given"),
        (";", "no role limits in ';'"),
    ],
)
def test_a_bad_role_limit_is_one_error_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _resolve([], {"JOB_WORKER_ROLE_LIMITS": text})
    assert str(caught.value).startswith(f"environment JOB_WORKER_ROLE_LIMITS: {message}")


def test_quota_settings_reach_the_config() -> None:
    env = {"JOB_WORKER_MAX_RUNNING_JOBS": "8", "JOB_WORKER_RATE_LIMIT": "20/s,40"}
    built = config_from_args(_resolve(["--max-running-jobs-per-client", "2"], env).args)
    assert (built.max_running_jobs, built.max_running_jobs_per_client) == (8, 2)
    assert built.rate_limit is not None
    assert (built.rate_limit.rate, built.rate_limit.burst) == (20.0, 40)
    unset = config_from_args(_resolve([]).args)
    assert (unset.max_running_jobs, unset.max_running_jobs_per_client, unset.rate_limit) == (
        None,
        None,
        None,
    )
