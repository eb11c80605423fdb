"""The committed stubs in protos/ are what protos/jamba.proto generates today.

They are committed so that the client installs with grpcio and protobuf alone (no protoc); this
test fails when someone edits the .proto and forgets to regenerate them. It runs the same
command the stubs were made with, from a copy of the repo layout (so the generated imports read
`from protos import jamba_pb2`), with the pinned grpcio-tools of the `test` extra: another
version writes different version headers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATED = ("jamba_pb2.py", "jamba_pb2_grpc.py", "jamba_pb2.pyi")
COMMAND = ["-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.", "--pyi_out=.",
           "protos/jamba.proto"]


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    (tmp_path / "protos").mkdir()
    shutil.copy(REPO / "protos" / "jamba.proto", tmp_path / "protos" / "jamba.proto")
    subprocess.run([sys.executable, *COMMAND], cwd=tmp_path, check=True, timeout=60)
    stale = [name for name in GENERATED
             if (tmp_path / "protos" / name).read_bytes() != (REPO / "protos" / name).read_bytes()]
    assert not stale, (f"protos/{', protos/'.join(stale)} are stale; regenerate from the repo root with "
                       f"`python {' '.join(COMMAND)}`")
