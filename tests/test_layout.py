"""The rooms and the rules between them, read from the code's own imports (every import, those
inside functions too: an import circle held together by a function-level import is still one).

    stages/          the model: no Ray, no Serve, no gRPC, nothing of cluster/
    cluster/runtime  the engine: no Serve, no gRPC, no HTTP, nothing of the rooms above it;
                     the scheduler knows no transport
    cluster/batch    offline jobs: nothing of Serve (but OpenAI's wire format) or the command line
    cluster/serve    the service: nothing of batch jobs or the command line
    cluster/cli      the command line: nothing imports it
    client/          the gRPC client: the generated protos, grpc and the standard library only
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "cluster", "client", "protos")


def _modules() -> dict[str, Path]:
    """The project's modules, by name (not build output: client/build/ when the client is built in place)."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if any(p in ("build", "dist") or p.endswith(".egg-info") for p in parts):
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, resolved: project modules by their full name (a name imported
    from a package is the submodule when there is one), other libraries by their top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and t.split(".")[0] in PACKAGES:
                t = t.rpartition(".")[0]  # an attribute of a module: the module
            found.add(t if t in MODULES else t.split(".")[0])
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "cluster" and len(parts) > 1 else parts[0]


def _reaches(start: str, rule) -> list[str]:
    """The modules `start` imports that break `rule` (a predicate on an imported name)."""
    return sorted(t for t in GRAPH[start] if rule(t))


def test_the_walker_sees_the_imports():
    """The graph is real: a few edges the code is known to have."""
    assert "cluster.runtime.scheduler" in GRAPH["cluster.runtime.engine"]
    assert "stages.microbatch" in GRAPH["cluster.runtime.scheduler"]
    assert "cluster.serve.replica" in GRAPH["cluster.serve.grpc_api"]
    assert "cluster.cli.run" in GRAPH["cluster.cli.main"]  # `from . import run`
    assert "cluster.batch.rows" in GRAPH["cluster.cli.run"]  # inside a function
    assert "torch" in GRAPH["stages.model"] and "ray" in GRAPH["cluster.runtime.pipeline"]


def test_no_import_circle():
    """No module reaches itself through the modules it imports (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


def test_no_circle_between_rooms():
    """Rooms (stages, client, protos, cluster.runtime, cluster.serve, cluster.batch, cluster.cli)
    depend on each other one way."""
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in GRAPH.items():
        for t in targets:
            if t in GRAPH and _room(t) != _room(module):
                rooms[_room(module)].add(_room(t))
    back = [(a, b) for a in rooms for b in rooms[a] if a in rooms.get(b, set())]
    assert back == []


SERVING = ("ray.serve", "grpc", "fastapi", "starlette", "pydantic", "protos")


def _is(prefixes):
    return lambda t: any(t == p or t.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("stages")])
def test_stages_know_no_ray_serve_grpc_or_cluster(module):
    assert _reaches(module, _is(("ray", "cluster", "grpc", "fastapi", "protos", "client"))) == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("cluster.runtime")])
def test_the_runtime_knows_no_serve_grpc_or_http(module):
    assert _reaches(module, _is(("cluster.serve", "cluster.batch", "cluster.cli", "client", *SERVING))) == []
    # (`ray` itself is allowed: placement, actors; its Serve is not. The top-level "ray" covers
    # both, so Serve is checked by the import statements themselves.)
    source = MODULES[module].read_text()
    assert "ray.serve" not in source and "from ray import serve" not in source


def test_the_scheduler_knows_no_transport():
    transport = ("ray", "torch", "cluster.runtime.dataplane", "cluster.runtime.channels", "cluster.runtime.pipeline",
                 "cluster.runtime.stage_endpoint", "cluster.runtime.local", "msgpack", "socket")
    assert _reaches("cluster.runtime.scheduler", _is(transport)) == []
    assert _reaches("cluster.runtime.intake", _is(transport)) == []


# OpenAI's wire format and what a request means are the pieces of the service a batch job shares:
# OpenAI batch files carry the HTTP API's requests and want its responses (cluster/batch/openai_batch.py).
BATCH_MAY_USE = {"cluster.serve.openai_protocol", "cluster.serve.openai_requests", "cluster.serve.tool_calls"}


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("cluster.batch")])
def test_batch_knows_no_serve_or_command_line(module):
    outside = _reaches(module, _is(("cluster.serve", "cluster.cli", "ray.serve", "grpc", "fastapi")))
    assert [t for t in outside if t not in BATCH_MAY_USE] == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("cluster.serve")])
def test_serve_knows_no_batch_or_command_line(module):
    assert _reaches(module, _is(("cluster.batch", "cluster.cli"))) == []


def test_nothing_imports_the_command_line():
    importers = [m for m, targets in GRAPH.items() if not m.startswith("cluster.cli")
                 and any(t.startswith("cluster.cli") for t in targets)]
    assert importers == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("client")])
def test_the_client_needs_only_grpc_and_the_protos(module):
    import sys

    allowed = set(sys.stdlib_module_names) | {"grpc", "protos", "google", "__future__"}
    outside = [t for t in GRAPH[module] if not t.startswith(("client", "protos")) and t.split(".")[0] not in allowed]
    assert outside == []


def test_every_room_says_what_it_is_and_no_file_is_too_long():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name.startswith(("cluster", "stages")):
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path} opens with no docstring"
        if name.startswith("cluster"):
            lines = len(path.read_text().splitlines())
            assert lines <= 600, f"{path} has {lines} lines"
