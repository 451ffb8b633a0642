"""The CLI's command line, with no server: parsing, precedence, addresses, rendering."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from jobworker.api import worker_pb2
from jobworker.cli import main, render
from jobworker.cli.args import (
    DEFAULT_SERVER,
    DEFAULT_TIMEOUT_S,
    EXIT_USAGE,
    Command,
    UsageError,
    parse,
)
from jobworker.client.address import ServerAddress, parse_server
from jobworker.client.connection import encode_grpc_timeout
from jobworker.engine.spec import JOB_PATH

NO_ENV: dict[str, str] = {}


def parsed(*argv: str, env: dict[str, str] | None = None) -> Command:
    return parse(list(argv), NO_ENV if env is None else env)


# -- create: everything after the command belongs to the job ---------------------------------


@pytest.mark.parametrize(
    ("argv", "command", "args", "limits"),
    [
        (["echo", "hello world"], "echo", ("hello world",), (0, 0, 0)),
        (["--max-cpu=50", "python3", "script.py"], "python3", ("script.py",), (50, 0, 0)),
        (
            ["--max-cpu", "50", "--max-memory=512", "python3", "script.py"],
            "python3",
            ("script.py",),
            (50, 512, 0),
        ),
        (["--max-iobps=1048576", "dd"], "dd", (), (0, 0, 1048576)),
        (
            ["bash", "-c", "sleep 10 && echo done"],
            "bash",
            ("-c", "sleep 10 && echo done"),
            (0, 0, 0),
        ),
        (["python3", "-u", "script.py", "-v"], "python3", ("-u", "script.py", "-v"), (0, 0, 0)),
        (
            ["echo", "--max-cpu=5", "-o", "json", "--help"],
            "echo",
            ("--max-cpu=5", "-o", "json", "--help"),
            (0, 0, 0),
        ),
        (["echo", "--", "x"], "echo", ("--", "x"), (0, 0, 0)),
        (["--", "-weird-cmd", "-x"], "-weird-cmd", ("-x",), (0, 0, 0)),
        (["--max-cpu=0", "true"], "true", (), (0, 0, 0)),
    ],
)
def test_create_splits_at_the_command(
    argv: list[str], command: str, args: tuple[str, ...], limits: tuple[int, int, int]
) -> None:
    result = parsed("create", *argv)
    assert (result.name, result.command, result.args) == ("create", command, args)
    assert (result.max_cpu, result.max_memory, result.max_iobps) == limits


@pytest.mark.parametrize(
    "argv",
    [
        ["create"],
        ["create", "--max-cpu=50"],
        ["create", "--max-cpu=lots", "echo"],
        ["create", "--max-cpu=-1", "echo"],
        ["create", f"--max-memory={2**31}", "echo"],
        ["create", ""],
        ["create", "--unknown", "echo"],
    ],
)
def test_create_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError) as caught:
        parsed(*argv)
    assert caught.value.command == "create"


def test_create_takes_a_time_limit_env_and_working_dir_before_the_command() -> None:
    result = parsed(
        "--timeout=2",
        "create",
        "--timeout",
        "5m",
        "--env",
        "A=1",
        "--env=B=x=y",
        "--env",
        "EMPTY=",
        "--workdir",
        "/srv",
        "env",
        "--timeout=9",
        "--env",
        "C=3",
    )
    assert result.timeout_seconds == 300
    assert result.env == (("A", "1"), ("B", "x=y"), ("EMPTY", ""))
    assert result.working_dir == "/srv"
    assert result.connection.timeout == 2.0  # the call's, given before "create"
    assert result.args == ("--timeout=9", "--env", "C=3")  # after the command: the job's
    assert (parsed("create", "--time-limit=30s", "true").timeout_seconds) == 30
    assert (parsed("create", "--time-limit=2h", "true").timeout_seconds) == 7200
    spelled = parsed("create", "--time-limit=4", "true")  # the other spelling
    assert (spelled.connection.timeout, spelled.timeout_seconds) == (DEFAULT_TIMEOUT_S, 4)
    plain = parsed("create", "true")
    assert (plain.timeout_seconds, plain.env, plain.working_dir) == (0, (), "")
    assert plain.connection.timeout == DEFAULT_TIMEOUT_S


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--timeout=soon"], "not a whole number of seconds"),
        (["--timeout=-1"], "must be between 0 and 2147483647 seconds"),
        ([f"--timeout={2**31}"], "must be between 0 and 2147483647 seconds"),
        (["--env=NOVALUE"], "expected NAME=VALUE, got 'NOVALUE'"),
        (["--env==x"], "expected NAME=VALUE, got '=x'"),
    ],
)
def test_create_option_errors_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        parsed("create", *argv, "true")
    assert caught.value.command == "create"


# -- get / list / stop / stream --------------------------------------------------------------


def test_get_stop_take_one_id() -> None:
    assert parsed("get", "7").job_id == "7"
    assert parsed("stop", "12").job_id == "12"
    assert parsed("list").name == "list"
    for argv in (["get"], ["stop"], ["get", "1", "2"], ["list", "x"]):
        with pytest.raises(UsageError):
            parsed(*argv)


@pytest.mark.parametrize(
    ("argv", "follow"),
    [
        (["1"], True),
        (["1", "--follow"], True),
        (["--follow", "1"], True),  # a bare --follow takes no value: 1 is the id
        (["-f", "1"], True),
        (["--follow=true", "1"], True),
        (["--follow=TRUE", "1"], True),
        (["--follow=1", "1"], True),
        (["-f=true", "1"], True),
        (["--follow=false", "1"], False),
        (["1", "--follow=false"], False),
        (["--follow=False", "1"], False),
        (["--follow=0", "1"], False),
        (["--no-follow", "1"], False),
    ],
)
def test_stream_follow_spellings(argv: list[str], follow: bool) -> None:
    result = parsed("stream", *argv)
    assert (result.job_id, result.follow) == ("1", follow)


def test_stream_follow_rewrite_only_touches_the_stream_command() -> None:
    # a job argument that looks like the flag is left alone
    assert parsed("create", "echo", "--follow=false").args == ("--follow=false",)
    # and so is anything after "--" in stream
    assert parsed("stream", "--", "--follow=false").job_id == "--follow=false"


@pytest.mark.parametrize(
    "argv", [["--follow=maybe", "1"], ["--follow", "--no-follow", "1"], ["--follow="]]
)
def test_stream_follow_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError) as caught:
        parsed("stream", *argv)
    assert caught.value.command == "stream"


# -- output format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "output"),
    [
        (["list"], "text"),
        (["-o", "json", "list"], "json"),
        (["--output=json", "list"], "json"),
        (["list", "-o", "json"], "json"),
        (["get", "--output", "json", "1"], "json"),
        (["-o", "json", "get", "-o", "text", "1"], "text"),  # the command's own flag wins
        (["-o", "json", "get", "1"], "json"),  # the command's default does not undo the global
        (["create", "-o", "json", "echo", "-o", "text"], "json"),  # the job's -o is the job's
        (["stream", "-o", "json", "1"], "json"),
    ],
)
def test_output_is_accepted_globally_and_per_command(argv: list[str], output: str) -> None:
    assert parsed(*argv).output == output


def test_unknown_output_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parsed("list", "-o", "yaml")


# -- connection settings: flags > environment > defaults -------------------------------------


def test_defaults() -> None:
    connection = parsed("list").connection
    assert connection.server == DEFAULT_SERVER == "localhost:50051"
    assert (connection.cert, connection.key, connection.ca) == (
        "certs/client-cert.pem",
        "certs/client-key.pem",
        "certs/ca-cert.pem",
    )
    assert connection.timeout == 5.0


def test_environment_beats_defaults() -> None:
    env = {"JOB_WORKER_SERVER": "prod.example.com:50051", "JOB_WORKER_CERT_PATH": "./mycerts"}
    connection = parsed("list", env=env).connection
    assert connection.server == "prod.example.com:50051"
    assert (connection.cert, connection.key, connection.ca) == (
        "mycerts/client-cert.pem",
        "mycerts/client-key.pem",
        "mycerts/ca-cert.pem",
    )


def test_flags_beat_environment() -> None:
    env = {"JOB_WORKER_SERVER": "env:1", "JOB_WORKER_CERT_PATH": "/env"}
    result = parsed(
        "--server=prod.example.com:50051",
        "--cert=certs/admin-client-cert.pem",
        "--key",
        "certs/admin-client-key.pem",
        "--timeout",
        "2.5",
        "create",
        "echo",
        "remote job",
        env=env,
    )
    connection = result.connection
    assert connection.server == "prod.example.com:50051"
    assert connection.cert == "certs/admin-client-cert.pem"
    assert connection.key == "certs/admin-client-key.pem"
    assert connection.ca == "/env/ca-cert.pem"  # not given as a flag: from the environment
    assert connection.timeout == 2.5
    assert (result.command, result.args) == ("echo", ("remote job",))


def test_empty_environment_values_are_ignored() -> None:
    connection = parsed(
        "list", env={"JOB_WORKER_SERVER": " ", "JOB_WORKER_CERT_PATH": ""}
    ).connection
    assert connection.server == DEFAULT_SERVER
    assert connection.cert == "certs/client-cert.pem"


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--server", "host:http", "list"], NO_ENV),
        (["--server", "[::1", "list"], NO_ENV),
        (["list"], {"JOB_WORKER_SERVER": "host:0"}),
        (["--timeout", "0", "list"], NO_ENV),
        (["--timeout", "-1", "list"], NO_ENV),
        (["--timeout", "soon", "list"], NO_ENV),
        (["--timeout", "inf", "list"], NO_ENV),
    ],
)
def test_bad_connection_settings_are_usage_errors(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        parsed(*argv, env=env)


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "x:1", "--timeout=3", "--cert", "c", "--key", "k", "--ca", "a", "list"],
        ["list", "--server", "x:1", "--timeout=3", "--cert", "c", "--key", "k", "--ca", "a"],
        ["--server=x:1", "list", "--timeout", "3", "--cert=c", "--key=k", "--ca=a"],
        ["get", "--server=x:1", "--timeout=3", "--cert=c", "--key=k", "--ca=a", "7"],
        [
            "stream",
            "7",
            "--follow=false",
            "--server=x:1",
            "--timeout=3",
            "--cert=c",
            "--key=k",
            "--ca=a",
        ],
        # After "create", --timeout is the job's: the call's goes before it.
        ["--timeout=3", "create", "--server=x:1", "--cert=c", "--key=k", "--ca=a", "true"],
    ],
)
def test_global_flags_go_before_or_after_the_command(argv: list[str]) -> None:
    command = parsed(*argv)
    assert command.connection.server == "x:1"
    assert command.connection.timeout == 3.0
    assert (command.connection.cert, command.connection.key, command.connection.ca) == (
        "c",
        "k",
        "a",
    )


def test_a_global_flag_after_the_command_wins_and_the_jobs_flags_stay_the_jobs() -> None:
    assert parsed("--server=x:1", "list", "--server=y:2").connection.server == "y:2"
    create = parsed("create", "--server=x:1", "echo", "--server=y:2", "--timeout=1")
    assert create.connection.server == "x:1"
    assert create.connection.timeout == DEFAULT_TIMEOUT_S
    assert create.args == ("--server=y:2", "--timeout=1")


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["bogus"], "jobworker --help"),
        (["--timeout=0", "list"], "jobworker --help"),
        (["--server=host:x", "get", "1"], "jobworker --help"),
        (["list", "--timeout=0"], "jobworker list --help"),
        (["list", "extra"], "jobworker list --help"),
        (["create", "--max-cpu=x", "echo"], "jobworker create --help"),
        (["get"], "jobworker get --help"),
    ],
)
def test_usage_errors_point_to_the_help_that_documents_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], hint: str
) -> None:
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("Error: ")
    assert err.endswith(f" (see '{hint}')\n")
    assert err.count("\n") == 1


def test_create_help_names_the_jobs_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"looked up in the job's PATH, not the server's (nor yours): PATH={JOB_PATH} " in out
    assert "server's PATH" not in out


# -- main(): exit codes without a server -----------------------------------------------------


def test_main_usage_error_is_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "Error: the following arguments are required: <job-id> (see 'jobworker get --help')\n"
    )


def test_main_help_and_version_are_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: jobworker" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("jobworker ")


# -- server addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("localhost:50051", "localhost", 50051, "localhost:50051"),
        ("prod.example.com", "prod.example.com", 50051, "prod.example.com:50051"),
        ("127.0.0.1:7", "127.0.0.1", 7, "127.0.0.1:7"),
        ("[::1]:50052", "::1", 50052, "[::1]:50052"),
        ("[::1]", "::1", 50051, "[::1]:50051"),
        ("::1", "::1", 50051, "[::1]:50051"),
        (" host:1 ", "host", 1, "host:1"),
    ],
)
def test_server_address_forms(text: str, host: str, port: int, shown: str) -> None:
    address = parse_server(text)
    assert address == ServerAddress(host, port)
    assert str(address) == shown


@pytest.mark.parametrize(
    "text", ["", ":50051", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x", "[]:1"]
)
def test_bad_server_addresses(text: str) -> None:
    with pytest.raises(ValueError, match=r"server address"):
        parse_server(text)


# -- grpc-timeout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (5.0, "5000000u"),
        (0.3, "300000u"),
        (0.0000001, "1u"),
        (0.0, "1u"),
        (99.999999, "99999999u"),
        (100.0, "100000m"),
        (86400.0, "86400000m"),
        (10**6, "1000000S"),
        (10**9, "16666667M"),
    ],
)
def test_grpc_timeout_fits_eight_digits_and_never_shortens(seconds: float, header: str) -> None:
    assert encode_grpc_timeout(seconds) == header
    digits = header[:-1]
    assert len(digits) <= 8


# -- rendering -------------------------------------------------------------------------------


def test_render_blocks_match_the_spec() -> None:
    created = worker_pb2.CreateJobRes(
        id="1",
        command="python3",
        args=["script.py"],
        status="RUNNING",
        startTime="2024-01-15T10:30:00Z",
    )
    assert render.created(created) == (
        "Job created:\nID: 1\nCommand: python3 script.py\nStatus: RUNNING\n"
        "StartTime: 2024-01-15T10:30:00Z\n"
    )
    running = worker_pb2.GetJobRes(
        id="1",
        command="python3",
        args=["script.py"],
        maxCPU=50,
        maxMemory=512,
        status="RUNNING",
        startTime="2024-01-15T10:30:00Z",
    )
    assert render.job_details(running) == (
        "Id: 1\nCommand: python3 script.py\nStatus: RUNNING\nStarted At: 2024-01-15T10:30:00Z\n"
        "Ended At: \nMaxCPU: 50\nMaxMemory: 512\nMaxIOBPS: 0\n"
    )
    jobs = [
        worker_pb2.Job(
            id="1",
            status="COMPLETED",
            startTime="2024-01-15T10:30:00Z",
            command="echo",
            args=["hello"],
        ),
        worker_pb2.Job(
            id="3", status="FAILED", startTime="2024-01-15T10:40:00Z", command="invalid-command"
        ),
    ]
    assert render.job_list(jobs) == (
        "1 COMPLETED StartTime: 2024-01-15T10:30:00Z Command: echo hello\n"
        "3 FAILED StartTime: 2024-01-15T10:40:00Z Command: invalid-command\n"
    )
    stopped = worker_pb2.StopJobRes(id="1", status="STOPPED")
    assert render.stopped(stopped) == "Job stopped successfully:\nID: 1\nStatus: STOPPED\n"


def test_render_quotes_arguments_like_a_shell() -> None:
    assert render.command_line("bash", ["-c", "sleep 10 && echo done"]) == (
        "bash -c 'sleep 10 && echo done'"
    )
    assert render.command_line("echo", ["it's"]) == "echo 'it'\"'\"'s'"


def test_details_beyond_the_spec_follow_its_block() -> None:
    job = worker_pb2.GetJobRes(
        id="4",
        command="stress",
        status="FAILED",
        exitCode=137,
        reason="out of memory (limit 50 MB)\x1b[2J",
        owner="alice",
        usage=worker_pb2.JobUsage(cpuSeconds=1.234, peakMemoryBytes=52_428_800, outputBytes=12_345),
    )
    assert render.job_details(job).endswith(
        "MaxIOBPS: 0\nExitCode: 137\nReason: out of memory (limit 50 MB)\\x1b[2J\n"
        "Owner: alice\nUsage: cpu 1.23 s, peak memory 52.4 MB, output 12,345 bytes\n"
    )


def test_details_show_timeout_env_and_working_dir_only_when_set() -> None:
    job = worker_pb2.GetJobRes(
        id="5",
        command="env",
        status="RUNNING",
        owner="admin",
        timeoutSeconds=30,
        env={"B": "two words", "A": "1", "EVIL": "\x1b[2J"},
        workingDir="/srv/data\n",
    )
    assert render.job_details(job).endswith(
        "MaxIOBPS: 0\nOwner: admin\nTimeout: 30 s\n"
        "Env: A=1 'B=two words' $'EVIL=\\x1b[2J'\nWorkingDir: /srv/data\\n\n"
    )
    bare = render.job_details(worker_pb2.GetJobRes(id="6", command="true", status="RUNNING"))
    assert not any(word in bare for word in ("Timeout:", "Env:", "WorkingDir:"))


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "STOPPED", "LOST"])
def test_exit_code_line_once_ended(status: str) -> None:
    job = worker_pb2.GetJobRes(id="2", command="false", status=status, exitCode=1)
    assert render.job_details(job).endswith("MaxIOBPS: 0\nExitCode: 1\n")


def test_json_uses_proto_names_in_proto_order_with_defaults() -> None:
    job = worker_pb2.Job(id="4", command="sleep", args=["1"], status="RUNNING")
    assert render.as_dict(job) == {
        "id": "4",
        "command": "sleep",
        "args": ["1"],
        "maxCPU": 0,
        "maxMemory": 0,
        "maxIOBPS": 0,
        "status": "RUNNING",
        "startTime": "",
        "endTime": "",
        "exitCode": 0,
        "reason": "",
        "owner": "",
        "timeoutSeconds": 0,
        "env": {},
        "workingDir": "",
    }
    job.usage.outputBytes = 5  # a message field: shown once the server sends it
    assert list(render.as_dict(job)) == [f.name for f in job.DESCRIPTOR.fields]
    usage = render.as_dict(job)["usage"]
    assert isinstance(usage, dict)
    assert usage["outputBytes"] == "5"  # int64: a string in proto3 JSON
    assert render.as_json([]) == "[]\n"


# -- escaping: nothing a job's owner (or a server) sends can drive the terminal -------------

HOSTILE_ARGS = ["\n2 COMPLETED StartTime: x Command: echo harmless\n", "\x1b[31m"]
HOSTILE_LINE = "echo $'\\n2 COMPLETED StartTime: x Command: echo harmless\\n' $'\\x1b[31m'"
CONTROLS = "".join(chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)])


def test_control_characters_in_arguments_are_shell_escaped() -> None:
    assert render.command_line("echo", HOSTILE_ARGS) == HOSTILE_LINE
    line = render.command_line("printf", ["%s|", f"a\\b'c{CONTROLS}\u202e\u2028 d"])
    assert all(ch not in line for ch in CONTROLS + "\u202e\u2028")
    assert render.command_line("echo", ["plain", "it's"]) == "echo plain 'it'\"'\"'s'"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for $'...' quoting")
def test_the_escaped_command_line_is_what_bash_would_run() -> None:
    words = ["%s\\0", *HOSTILE_ARGS, f"a\\b'c{CONTROLS[1:]}\u202e\u2028 d", "", "é"]
    line = render.command_line("printf", words)
    ran = subprocess.run(["bash", "-c", line], capture_output=True, check=True)
    assert ran.stdout.split(b"\0")[:-1] == [word.encode() for word in words[1:]]


def test_every_field_of_the_text_output_is_escaped() -> None:
    job = worker_pb2.GetJobRes(
        id="1\x1b[2J",
        command="echo",
        args=HOSTILE_ARGS,
        status="RUN\rNING",
        startTime="2024\n",
        endTime="\x9b31m",
    )
    texts = [
        render.job_details(job),
        render.job_list([worker_pb2.Job(id="1\n2", status="\x1b", command="x\x07")]),
        render.created(worker_pb2.CreateJobRes(id="\x00", status="\x7f", startTime="\x85")),
        render.stopped(worker_pb2.StopJobRes(id="\x1b]0;title\x07", status="\u2029")),
    ]
    for text in texts:
        fields = text.splitlines()
        assert all(ch not in text for ch in CONTROLS.replace("\n", "") + "\u2029\u202e")
        assert text.count("\n") == len(fields)
    assert "Id: 1\\x1b[2J\n" in texts[0]
    assert f"Command: {HOSTILE_LINE}\n" in texts[0]
    assert "Ended At: \\u009b31m\n" in texts[0]
    assert texts[1] == "1\\n2 \\x1b StartTime:  Command: $'x\\x07'\n"
