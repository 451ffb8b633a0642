"""Regenerate the committed Python code for protos/worker.proto.

Writes into jobworker/api/ (or the directory given as the first argument):
worker_pb2.py + worker_pb2.pyi (protobuf messages), worker_grpc.py (purerpc
stubs, used by the server and client) and worker_pb2_grpc.py (grpcio stubs,
used only by tests as the outside client). Imports between the generated
modules are rewritten to be package-relative.

Run through `nox -s protos`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO = "worker.proto"
GENERATED = ("worker_pb2.py", "worker_pb2.pyi", "worker_grpc.py", "worker_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc (grpc_tools) with the purerpc plugin into out_dir."""
    plugin = shutil.which("protoc-gen-purerpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        sys.exit("protoc-gen-purerpc not found next to this Python (pip install purerpc)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--plugin=protoc-gen-purerpc={plugin}",
                f"--purerpc_out={tmp}",
                str(PROTO_DIR / PROTO),
            ],
            check=True,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(tmp) / name).read_text()
            # protoc writes top-level imports; the code lives in a package.
            text = re.sub(
                r"^import worker_pb2 as ", "from . import worker_pb2 as ", text, flags=re.M
            )
            (out_dir / name).write_text(text)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "jobworker" / "api"
    generate(out)
    print(f"generated {', '.join(GENERATED)} in {out}")


if __name__ == "__main__":
    main()
