"""The client is a distribution of its own (client/pyproject.toml): `pip install ./client` into a
fresh virtual environment that sees nothing of this one gives a working `jamba-client`, with
grpcio and protobuf and neither torch nor Ray (nor numpy, nor the server's packages).

The installed command then talks to a real gRPC server on loopback: a small servicer of the
generated protos in this process, which echoes what it is sent, so the test sees the rows
parsed and the requests built by the installed code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos import jamba_pb2 as pb
from protos import jamba_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


class Echo(pb_grpc.JambaServiceServicer):
    """ModelInfo, and a Generate whose completion of a prompt is its own token ids (or its text's length)."""

    def ModelInfo(self, request, context):
        return pb.ModelInfoResponse(model_name="echo", task="causal-lm", num_layers=2, vocab_size=100,
                                    stages=[pb.StageInfo(index=0, start_layer=0, end_layer=2)], num_slots=4)

    def Generate(self, request, context):
        out = []
        for p in request.prompts:
            ids = list(p.token_ids.ids) or [len(p.text)]
            out.append(pb.Completion(output_ids=ids, text=" ".join(map(str, ids)), finish_reason="length",
                                     usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=len(ids))))
        return pb.GenerateResponse(completions=out)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A virtual environment with the client distribution installed, and nothing else of ours.
    It is built from a copy of client/ and protos/, so no build output lands in the checkout."""
    src = tmp_path_factory.mktemp("client-src")
    for part in ("client", "protos"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    path = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run([str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src / "client")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return path, env


def test_the_client_installs_without_torch_or_ray(venv, tmp_path):
    path, env = venv
    check = ("import importlib.util as u, sys, client, client.cli, client.rows, protos.jamba_pb2_grpc\n"
             "missing = [m for m in ('torch', 'ray', 'numpy', 'stages', 'cluster') if u.find_spec(m)]\n"
             "assert not missing, missing\n"
             "assert sys.prefix != sys.base_prefix\n"
             "print(client.__file__)")
    r = subprocess.run([str(path / "bin" / "python"), "-c", check], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(path))  # the installed copy, not this checkout's


def test_the_installed_command_calls_a_server(venv, tmp_path):
    path, env = venv
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_JambaServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cli = [str(path / "bin" / "jamba-client")]
        r = subprocess.run([*cli, "info", "--address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["model_name"] == "echo" and info["stages"] == [{"index": 0, "start_layer": 0, "end_layer": 2}]
        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"input_ids": [5, 6, 7], "max_new_tokens": 3}\n{"prompt": "hello"}\n{"text": "x"}\n')
        r = subprocess.run([*cli, "generate", "--address", f"127.0.0.1:{port}", "--input", str(rows)],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert r.returncode == 1  # the third row is refused by the row checks (client/rows.py)
        out = [json.loads(line) for line in r.stdout.splitlines()]
        assert out[0]["output_ids"] == [5, 6, 7] and out[1]["output_ids"] == [5]
        assert out[2] == {"line": 3, "error": "generate takes its input as prompt, input_ids or messages; "
                                              "text is the output field"}
    finally:
        server.stop(None)
