"""The Kubernetes deployment under k8s/, checked without a cluster.

- every YAML document parses; RayService / RayJob / RayCluster documents validate against KubeRay's
  v1.7.0 CRDs (../shared/k8s-schemas) made strict, so a misspelled field fails; core objects get a
  structural check per kind;
- each serveConfigV2 (and the repo's serve_config.yaml) is a valid Serve config whose import paths,
  servicer functions, deployment options and application args fit this project's code;
- resources fit the pipelines (placement bundles from build_app itself vs the worker pods), and the
  layer splits are what the planner gives, every stage fitting an 80 GB GPU;
- the RayJob runs `jamba batch` and cleans up after itself; the image and the pods are non-root,
  with the gRPC port as the only one open to clients.

Nothing here starts Ray or loads a model.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
GiB = 2**30
PLAN_GPU_MEMORY = 80 * GiB  # the GPU the plans are made for
RAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SERVICER = "protos.jamba_pb2_grpc.add_JambaServiceServicer_to_server"


# ---- loading ---------------------------------------------------------------------------------
def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


class _NoDuplicateKeys(yaml.SafeLoader):
    """safe_load keeps the last of two equal keys silently; a manifest should have neither."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dups = {k for k in keys if keys.count(k) > 1}
        if dups:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dups)}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


DOCS = [(p.name, i, d) for p in _manifest_files() for i, d in enumerate(_load(p))]


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, _, d in DOCS if d.get("kind") == kind]


def _doc_id(item) -> str:
    f, i, d = item
    return f"{f}#{i}:{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"


def _cluster_spec(doc: dict) -> dict:
    return {"RayService": lambda: doc["spec"]["rayClusterConfig"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayCluster": lambda: doc["spec"]}[doc["kind"]]()


def _ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _pair_id(x) -> str:
    return x["metadata"]["name"] if isinstance(x, dict) else x


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_no_duplicate_keys(path):
    list(yaml.load_all(path.read_text(), Loader=_NoDuplicateKeys))
    for doc in _load(path):
        if doc.get("kind") == "RayService":
            yaml.load(doc["spec"]["serveConfigV2"], Loader=_NoDuplicateKeys)


def test_manifests_exist():
    names = {p.name for p in _manifest_files()}
    for required in ("rayservice-demo.yaml", "rayservice-jamba-mini-1.6.yaml", "rayservice-jamba-large-1.6.yaml",
                     "rayservice-jamba-large-1.6-int8-experts.yaml",
                     "rayjob-batch-score.yaml", "weights.yaml"):
        assert required in names
    assert _of_kind("RayService") and _of_kind("RayJob") and _of_kind("NetworkPolicy")


@pytest.mark.parametrize("item", DOCS, ids=_doc_id)
def test_every_document_is_a_named_object(item):
    _, _, doc = item
    assert isinstance(doc, dict)
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"]
    assert isinstance(doc.get("kind"), str) and doc["kind"]
    assert isinstance(doc.get("metadata"), dict)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"].get("name", "")), doc["metadata"]


# ---- KubeRay CRDs, strict -------------------------------------------------------------------------
def _strict(schema):
    """`additionalProperties: false` on every object schema that lists its properties (and neither
    allows extra properties nor preserves unknown fields), so that a misspelled field fails."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_VALIDATORS: dict[str, object] = {}


def _validator(kind: str):
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {SCHEMAS} (the shared/ folder beside the project)")
    if kind not in _VALIDATORS:
        import jsonschema

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~20k lines: libyaml if there
        crd = yaml.load((SCHEMAS / RAY_KINDS[kind]).read_text(), Loader=loader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        _VALIDATORS[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return _VALIDATORS[kind]


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]


RAY_DOCS = [item for item in DOCS if item[2].get("kind") in RAY_KINDS]


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_ray_resources_validate_against_the_crds(item):
    _, _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(doc) == []


def test_strict_validation_catches_misspelled_fields():
    (_, service), = [(f, d) for f, d in _of_kind("RayService") if d["metadata"]["name"] == "jamba-mini"]
    assert _errors(service) == []

    def mutated(edit) -> dict:
        doc = copy.deepcopy(service)
        edit(doc)
        return doc

    def rename(obj: dict, old: str, new: str) -> None:
        obj[new] = obj.pop(old)

    rcc = lambda d: d["spec"]["rayClusterConfig"]  # noqa: E731
    worker = lambda d: rcc(d)["workerGroupSpecs"][0]  # noqa: E731
    cases = {
        "spec.serveConfigv2": mutated(lambda d: rename(d["spec"], "serveConfigV2", "serveConfigv2")),
        "rayClusterConfig.authOption": mutated(lambda d: rename(rcc(d), "authOptions", "authOption")),
        "workerGroupSpecs[0].minReplica": mutated(lambda d: rename(worker(d), "minReplicas", "minReplica")),
        "container.imagePullPolicyy": mutated(
            lambda d: rename(_ray_container(worker(d)["template"]), "imagePullPolicy", "imagePullPolicyy")),
        "container securityContext.allowPrivilegeEscalaton": mutated(
            lambda d: rename(_ray_container(worker(d)["template"])["securityContext"],
                             "allowPrivilegeEscalation", "allowPrivilegeEscalaton")),
        "authOptions.mode: tokens": mutated(lambda d: rcc(d)["authOptions"].update(mode="tokens")),
        "replicas: '2' (a string)": mutated(lambda d: worker(d).update(replicas="2")),
    }
    for what, doc in cases.items():
        assert _errors(doc), f"{what} was not rejected"


# ---- core objects: a structural check per kind ------------------------------------------------------
def _check_service(doc):
    spec = doc["spec"]
    assert doc["apiVersion"] == "v1"
    assert isinstance(spec.get("selector"), dict) and spec["selector"]
    assert spec.get("type", "ClusterIP") in ("ClusterIP", "NodePort", "LoadBalancer")
    assert spec["ports"]
    for p in spec["ports"]:
        assert isinstance(p["port"], int) and 0 < p["port"] < 65536
        assert isinstance(p.get("targetPort", p["port"]), (int, str))
        assert p.get("protocol", "TCP") in ("TCP", "UDP", "SCTP")
        assert p.get("name")


def _check_peer(peer):
    assert set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"} and peer
    for key in ("podSelector", "namespaceSelector"):
        if key in peer:
            assert set(peer[key]) <= {"matchLabels", "matchExpressions"}


def _check_network_policy(doc):
    spec = doc["spec"]
    assert doc["apiVersion"] == "networking.k8s.io/v1"
    assert set(spec) <= {"podSelector", "policyTypes", "ingress", "egress"}
    assert isinstance(spec["podSelector"], dict)
    assert set(spec["podSelector"]) <= {"matchLabels", "matchExpressions"}
    assert spec["policyTypes"] and set(spec["policyTypes"]) <= {"Ingress", "Egress"}
    for rule in spec.get("ingress", []):
        assert set(rule) <= {"from", "ports"}
        for peer in rule.get("from", []):
            _check_peer(peer)
        for port in rule.get("ports", []):
            assert set(port) <= {"protocol", "port", "endPort"}
            assert port.get("protocol", "TCP") in ("TCP", "UDP", "SCTP")
            assert isinstance(port["port"], (int, str))


def _check_pvc(doc):
    spec = doc["spec"]
    assert doc["apiVersion"] == "v1"
    assert spec["accessModes"] and set(spec["accessModes"]) <= {
        "ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
    assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti|Pi)?", str(spec["resources"]["requests"]["storage"]))


def _check_job(doc):
    assert doc["apiVersion"] == "batch/v1"
    pod = doc["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["containers"] and all(c.get("name") and c.get("image") for c in pod["containers"])
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in pod.get("volumes", [])}


def _check_gateway(doc):
    assert doc["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert doc["spec"]["gatewayClassName"]
    for listener in doc["spec"]["listeners"]:
        assert listener["name"] and isinstance(listener["port"], int) and listener["protocol"] in ("HTTPS", "TLS", "HTTP")
        if listener["protocol"] == "HTTPS":
            assert listener["tls"]["mode"] == "Terminate" and listener["tls"]["certificateRefs"]


def _check_grpc_route(doc):
    assert doc["apiVersion"] == "gateway.networking.k8s.io/v1"
    gateways = {d["metadata"]["name"] for _, d in _of_kind("Gateway")}
    assert {p["name"] for p in doc["spec"]["parentRefs"]} <= gateways
    services = {d["metadata"]["name"]: d for _, d in _of_kind("Service")}
    for rule in doc["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            svc = services[ref["name"]]
            (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]]
            assert port["appProtocol"] == "kubernetes.io/h2c"


CORE_CHECKS = {"Service": _check_service, "NetworkPolicy": _check_network_policy, "PersistentVolumeClaim": _check_pvc,
               "Job": _check_job, "Gateway": _check_gateway, "GRPCRoute": _check_grpc_route}
CORE_DOCS = [item for item in DOCS if item[2].get("kind") not in RAY_KINDS]


@pytest.mark.parametrize("item", CORE_DOCS, ids=_doc_id)
def test_core_objects_are_well_formed(item):
    _, _, doc = item
    assert doc["kind"] in CORE_CHECKS, f"no check for kind {doc['kind']}: add one"
    CORE_CHECKS[doc["kind"]](doc)


# ---- Serve configs ------------------------------------------------------------------------------------
SERVE_CONFIGS = [(f"{f}:{d['metadata']['name']}", _serve_config(d)) for f, d in _of_kind("RayService")]
SERVE_CONFIGS.append(("serve_config.yaml", yaml.safe_load((ROOT / "serve_config.yaml").read_text())))


def _builder_keys() -> set[str]:
    from cluster.serve.app import APP_ARGS

    return APP_ARGS


@pytest.mark.parametrize("name,config", SERVE_CONFIGS, ids=[n for n, _ in SERVE_CONFIGS])
def test_serve_config_fits_the_code(name, config, monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    import cluster.serve.app
    import cluster.serve.deployment

    schema = ServeDeploySchema.model_validate(config)
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER]
    for fn in schema.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(fn))
    known = _builder_keys()
    deployment_fields = set(DeploymentSchema.model_fields)
    for raw, app in zip(config["applications"], schema.applications):
        assert import_attr(app.import_path) is cluster.serve.app.build_app
        assert "model" in app.args
        assert set(app.args) <= known, f"{app.name}: unknown args {set(app.args) - known}"
        bundles, replicas = _built(app.args, monkeypatch)  # build_app takes them (no Ray, no model)
        assert replicas >= 1
        if app.args.get("start_in_background", True):
            assert bundles is None  # the replica places its stages itself, in the background
        else:  # Serve places the replica's bundle and its stages' together
            assert len(bundles) == int(app.args.get("stages", 1)) + 1
        for dep in raw.get("deployments", []):
            assert set(dep) <= deployment_fields, f"{app.name}: not deployment options: {set(dep) - deployment_fields}"
            assert dep["name"] == cluster.serve.deployment.JambaService.name
    assert len({a.name for a in schema.applications}) == len(schema.applications)


@pytest.mark.parametrize("f,doc", _of_kind("RayService"), ids=_pair_id)
def test_serve_config_matches_the_head_ports(f, doc):
    config = _serve_config(doc)
    head = _ray_container(_cluster_spec(doc)["headGroupSpec"]["template"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve-grpc"] == config["grpc_options"]["port"] == 9000
    # KubeRay health-checks Serve's HTTP proxy on the port named `serve`, from outside the pod.
    assert ports["serve"] == config["http_options"]["port"]
    assert config["http_options"]["host"] == "0.0.0.0"
    assert ports["metrics"] == 8080


# ---- resources and plans ----------------------------------------------------------------------------
def _built(args: dict, monkeypatch):
    """build_app's own deployment: placement bundles and replicas, without writing the demo model."""
    import cluster.serve.app
    from cluster.serve.app import build_app

    monkeypatch.setattr(cluster.serve.app, "resolve_model_dir", lambda model: model)
    deployment = build_app(args)._bound_deployment
    return deployment._replica_config.placement_group_bundles, deployment._deployment_config.num_replicas


def _quantity(q) -> float:
    q = str(q)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?", q)
    assert m, q
    return float(m.group(1)) * {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]


def _worker_pods(cluster: dict) -> list[dict]:
    """One entry per worker pod: the Ray resources KubeRay gives it (CPU and GPU from the limits unless
    rayStartParams say otherwise)."""
    pods = []
    for group in cluster["workerGroupSpecs"]:
        c = _ray_container(group["template"])
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        params = group.get("rayStartParams", {})
        res = {"CPU": float(params.get("num-cpus", _quantity(limits["cpu"]))),
               "GPU": float(params.get("num-gpus", _quantity(limits.get("nvidia.com/gpu", 0))))}
        if "nvidia.com/gpu" in limits:
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pods += [res] * group["replicas"] * group.get("numOfHosts", 1)
    return pods


@pytest.mark.parametrize("f,doc", _of_kind("RayService"), ids=_pair_id)
def test_resources_match_the_pipelines(f, doc, monkeypatch):
    config, cluster = _serve_config(doc), _cluster_spec(doc)
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # the head runs no stage
    pods = _worker_pods(cluster)
    bundles = []
    for app in config["applications"]:
        args = app["args"]
        # A RayService moves traffic to an upgraded cluster once its applications are RUNNING:
        # that must mean the pipelines serve (see cluster/service.py:build_app).
        assert args.get("start_in_background") is False, app["name"]
        app_bundles, replicas = _built(args, monkeypatch)
        stages = int(args.get("stages", 1))
        assert len(app_bundles) == stages + 1
        gpus_per_stage = float(args.get("gpus_per_stage", 0))
        # The brief's rule: GPUs per worker x workers >= stages x replicas (one GPU per stage).
        if gpus_per_stage:
            assert sum(p["GPU"] for p in pods) >= stages * replicas * gpus_per_stage
        bundles += app_bundles * replicas
    for key in ("CPU", "GPU"):
        need = sum(b.get(key, 0) for b in bundles)
        have = sum(p[key] for p in pods)
        assert need <= have, f"{key}: the pipelines need {need}, the workers have {have}"
    for b in bundles:  # every bundle fits on some worker pod
        assert any(all(b.get(k, 0) <= p[k] for k in ("CPU", "GPU")) for p in pods), b
    # A first-fit packing of all bundles onto the pods (what PACK does when it can).
    free = [dict(p) for p in pods]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        slot = next((p for p in free if all(b.get(k, 0) <= p[k] + 1e-9 for k in ("CPU", "GPU"))), None)
        assert slot is not None, f"bundle {b} does not fit next to the others"
        for k in ("CPU", "GPU"):
            slot[k] -= b.get(k, 0)


def _model_config(args: dict):
    from cluster.runtime.plan import PRESETS, load_config
    from stages.config import JambaConfig
    from stages.demo import trained_model_dir

    if args["model"] in ("demo", "demo-classifier"):
        return JambaConfig.from_file(trained_model_dir("classification" if args["model"] == "demo-classifier" else "lm"))
    assert args.get("name") in PRESETS, f"args.name should name the preset whose plan this is: {args.get('name')}"
    return load_config(args["name"])


def _gpu_memory_floor(cluster: dict) -> int | None:
    """The least GPU memory the workers' node affinity admits (nvidia.com/gpu.memory, MiB), in bytes."""
    floors = []
    for group in cluster["workerGroupSpecs"]:
        terms = group["template"]["spec"].get("affinity", {}).get("nodeAffinity", {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
        for term in terms:
            for e in term.get("matchExpressions", []):
                if e["key"] == "nvidia.com/gpu.memory" and e["operator"] == "Gt":
                    floors.append((int(e["values"][0]) + 1) * 2**20)
    return min(floors) if floors else None


@pytest.mark.parametrize("f,doc", _of_kind("RayService"), ids=_pair_id)
def test_layer_splits_are_the_planners(f, doc):
    from cluster.runtime.plan import make_plan, parse_layer_split

    cluster = _cluster_spec(doc)
    for app in _serve_config(doc)["applications"]:
        args = app["args"]
        stages = int(args.get("stages", 1))
        if stages == 1:
            continue
        config = _model_config(args)
        gpu = bool(float(args.get("gpus_per_stage", 0)))
        ctx = int(args.get("max_seq_len") or 4096)
        plans = make_plan(config, stages, ctx=ctx, gpu_memory=PLAN_GPU_MEMORY if gpu else None,
                          quantize=args.get("quantize"))
        assert "layer_split" in args, f"{app['name']}: give the planner's split explicitly"
        assert parse_layer_split(args["layer_split"], config.num_hidden_layers) == [(p.start, p.end) for p in plans]
        if gpu:
            slots = int(args.get("num_slots", 32))
            floor = _gpu_memory_floor(cluster)
            assert floor is not None, "GPU workers should pin the GPU size the plan assumes"
            assert floor <= PLAN_GPU_MEMORY * 1.01
            for memory in (PLAN_GPU_MEMORY, floor):
                for p in plans:  # weights + num_slots sequences of max_seq_len, 10% reserved
                    assert p.max_sequences(memory) >= slots, (p.index, memory, p.max_sequences(memory))


def test_large_does_not_fit_on_eight_gpus():
    """Why Jamba-Large-1.6 takes 16 stages: bf16 on 8 x 80 GiB leaves stages without room."""
    from cluster.runtime.plan import load_config, make_plan

    plans = make_plan(load_config("jamba-large-1.6"), 8, gpu_memory=PLAN_GPU_MEMORY)
    assert any(p.max_sequences(PLAN_GPU_MEMORY) == 0 for p in plans)
    plans = make_plan(load_config("jamba-large-1.6"), 16, gpu_memory=PLAN_GPU_MEMORY)
    assert all(p.max_sequences(PLAN_GPU_MEMORY) > 0 for p in plans)


def test_large_fits_eight_gpus_with_int8_experts():
    """...and why rayservice-jamba-large-1.6-int8-experts.yaml takes 8: int8 experts fit 8 x 80 GiB."""
    from cluster.runtime.plan import load_config, make_plan

    plans = make_plan(load_config("jamba-large-1.6"), 8, gpu_memory=PLAN_GPU_MEMORY, quantize="int8-experts")
    assert all(p.max_sequences(PLAN_GPU_MEMORY) >= 128 for p in plans)
    (doc,) = [d for f, d in _of_kind("RayService") if f == "rayservice-jamba-large-1.6-int8-experts.yaml"]
    (app,) = _serve_config(doc)["applications"]
    assert app["args"]["quantize"] == "int8-experts" and int(app["args"]["stages"]) == 8
    assert sum(p["GPU"] for p in _worker_pods(_cluster_spec(doc))) == 8  # one 8-GPU node


PLAN_FILES = sorted(K8S.glob("*.plan.txt"))


@pytest.mark.parametrize("path", PLAN_FILES, ids=[p.name for p in PLAN_FILES])
def test_plan_files_are_the_planners_output(path):
    """Each k8s/*.plan.txt is `$ jamba plan ...` then its output, as the planner prints it today, and
    its split is the one a manifest uses."""
    from cluster.runtime.plan import format_plan, load_config, make_plan, parse_bytes
    from stages.config import JambaConfig
    from stages.demo import trained_model_dir

    command, *output = path.read_text().rstrip("\n").split("\n")
    assert command.startswith("$ jamba plan ")
    argv = shlex.split(command[2:].split("#")[0])[2:]
    opts = dict(zip(argv[::2], argv[1::2]))
    model = opts["--model"]
    config = JambaConfig.from_file(trained_model_dir("lm")) if model == "$JAMBA_HOME/demo-lm" else load_config(model)
    memory = parse_bytes(opts["--gpu-memory"]) if "--gpu-memory" in opts else None
    ctx = int(opts.get("--max-context", 4096))
    quantize = opts.get("--quantize")
    also = tuple(int(v) for k, v in zip(argv[::2], argv[1::2]) if k == "--also-context")
    plans = make_plan(config, int(opts["--stages"]), ctx=ctx, gpu_memory=memory, quantize=quantize)
    assert "\n".join(output) == format_plan(plans, config, ctx, memory, quantize=quantize, also_contexts=also)
    split = ",".join(str(p.end - p.start) for p in plans)
    used = [a["args"].get("layer_split") for _, d in _of_kind("RayService") for a in _serve_config(d)["applications"]]
    assert split in used, f"{path.name}: split {split} is used by no RayService"


# ---- gRPC exposure, network policy, security ----------------------------------------------------------
def _by_file(kind: str, f: str) -> list[dict]:
    return [d for g, d in _of_kind(kind) if g == f]


def _instance(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/instance"]


def _templates(doc: dict) -> list[dict]:
    cluster = _cluster_spec(doc)
    out = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append(doc["spec"]["submitterPodTemplate"])
    return out


def _allows(policy: dict, pod_labels: dict, port: int, source: dict | None) -> bool:
    """Whether one NetworkPolicy admits TCP `port` on a pod with `pod_labels` from a pod with labels
    `source` in the same namespace (None: from outside the cluster). Label selectors only."""
    def match(selector, labels):
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    if not match(policy["spec"]["podSelector"], pod_labels):
        return False
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(p["port"] == port for p in rule["ports"]):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            if source is not None and set(peer) == {"podSelector"} and match(peer["podSelector"], source):
                return True
    return False


RAY_WORKLOADS = _of_kind("RayService") + _of_kind("RayJob")


@pytest.mark.parametrize("f,doc", RAY_WORKLOADS, ids=_pair_id)
def test_network_policies(f, doc):
    instance = _instance(doc)
    head_labels = {**_cluster_spec(doc)["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
    worker_labels = {**_cluster_spec(doc)["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
                     "ray.io/node-type": "worker"}
    for t in _templates(doc):  # every pod carries the instance label the policies select on
        assert t["metadata"]["labels"]["app.kubernetes.io/instance"] == instance
    policies = [p for p in _by_file("NetworkPolicy", f) if p["metadata"]["labels"]["app.kubernetes.io/instance"] == instance]
    assert policies

    def allowed(labels, port, source):
        return any(_allows(p, labels, port, source) for p in policies)

    outsider = {"app.kubernetes.io/instance": "someone-else"}
    serving = doc["kind"] == "RayService"
    # From outside the cluster and from other pods: the head's gRPC and HTTP (OpenAI API) ports
    # (services), nothing else.
    for source in (None, outsider):
        assert allowed(head_labels, 9000, source) is serving
        assert allowed(head_labels, 8000, source) is serving
        for port in (6379, 8265, 10001, 8080, 52365):
            assert not allowed(head_labels, port, source), port
        for port in (9000, 6379, 8080, 10001, 52365):
            assert not allowed(worker_labels, port, source), port
    # Between the pods of this Ray cluster: everything.
    for port in (6379, 8265, 10001, 52365, 12345):
        assert allowed(head_labels, port, worker_labels) and allowed(worker_labels, port, head_labels)
    if doc["kind"] == "RayJob":  # the submitter pod calls the job API on the head
        submitter = doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        assert allowed(head_labels, 8265, submitter)
    # The KubeRay operator reaches the dashboard API (and the Serve proxy's health endpoint).
    operator_rules = [peer for p in policies for r in p["spec"].get("ingress", []) for peer in r.get("from", [])
                      if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                      == "kuberay-operator"]
    assert operator_rules and all("namespaceSelector" in peer for peer in operator_rules)


@pytest.mark.parametrize("f,doc", _of_kind("RayService"), ids=_pair_id)
def test_grpc_service(f, doc):
    (svc,) = [s for s in _by_file("Service", f) if s["metadata"]["name"] == f"{doc['metadata']['name']}-grpc"]
    grpc_port, http_port = svc["spec"]["ports"]
    assert grpc_port["port"] == 9000 and grpc_port["targetPort"] == "serve-grpc"
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    # The OpenAI HTTP API: Serve's HTTP proxy, the head's port named `serve`.
    assert http_port["port"] == 8000 and http_port["targetPort"] == "serve" and http_port["appProtocol"] == "http"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": _instance(doc), "ray.io/node-type": "head",
                                       "ray.io/serve": "true"}
    # What KubeRay's serveService would drop (it keeps only the port named `serve`) is not relied on.
    assert "serveService" not in doc["spec"]


def _security_ok(pod: dict, container: dict) -> None:
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    assert csc.get("allowPrivilegeEscalation") is False, container["name"]
    assert csc.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
    assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, container["name"]
    assert csc.get("runAsUser", psc.get("runAsUser")) == 1000, container["name"]
    assert not csc.get("privileged", False)


def _pod_specs():
    for f, doc in RAY_WORKLOADS:
        for t in _templates(doc):
            yield f, doc, t["spec"]
    for f, doc in _of_kind("Job"):
        yield f, doc, doc["spec"]["template"]["spec"]


def test_pods_run_as_non_root_with_limits():
    images = set()
    for f, doc, pod in _pod_specs():
        for c in pod.get("initContainers", []) + pod["containers"]:
            _security_ok(pod, c)
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (f, c["name"], kind)
            if doc["kind"] in RAY_KINDS:
                images.add(c["image"])
        assert pod.get("automountServiceAccountToken") is False, f
    assert len(images) == 1, images  # one image for every Ray pod


@pytest.mark.parametrize("f,doc", RAY_WORKLOADS, ids=_pair_id)
def test_ray_token_auth_and_metrics(f, doc):
    cluster = _cluster_spec(doc)
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == "2.60.0"
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group["template"]).get("ports", [])}
        assert ports["metrics"] == 8080


@pytest.mark.parametrize("f,doc", _of_kind("RayService"), ids=_pair_id)
def test_grpc_message_cap_reaches_the_proxies(f, doc):
    from cluster.serve.app import MAX_MESSAGE_BYTES as cap

    cluster = _cluster_spec(doc)
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        assert _env(_ray_container(group["template"]))["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(cap)


def _weights_claims() -> set[str]:
    return {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}


def _check_model_dir(template: dict, model_dir: str, need_claim: bool) -> None:
    c = _ray_container(template) if template["spec"]["containers"][0]["name"] != "ray-job-submitter" else None
    if c is None:
        return
    assert _env(c)["JAMBA_MODEL_DIR"] == model_dir
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    mounts = [m for m in c.get("volumeMounts", []) if model_dir.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{model_dir} is on no volume"
    if need_claim:
        (mount,) = mounts
        volume = volumes[mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] in _weights_claims()
        assert mount.get("readOnly") is True and volume["persistentVolumeClaim"].get("readOnly") is True


@pytest.mark.parametrize("f,doc", _of_kind("RayService"), ids=_pair_id)
def test_weights_come_from_the_volume(f, doc):
    (app, *_) = _serve_config(doc)["applications"]
    model = app["args"]["model"]
    demo = model in ("demo", "demo-classifier")
    model_dir = _env(_ray_container(_cluster_spec(doc)["headGroupSpec"]["template"]))["JAMBA_MODEL_DIR"]
    if not demo:
        assert model == model_dir
    for t in _templates(doc):
        _check_model_dir(t, model_dir, need_claim=not demo)
        if demo:  # `demo` resolves under $JAMBA_HOME: the same, written, directory on every pod
            jamba_home = _env(_ray_container(t))["JAMBA_HOME"]
            assert model_dir == f"{jamba_home}/demo-lm"
            assert any(jamba_home == m["mountPath"] for c in t["spec"]["initContainers"]
                       for m in c.get("volumeMounts", []))


# ---- the batch RayJob ------------------------------------------------------------------------------
def _job_argv(doc: dict) -> list[str]:
    """The entrypoint as the job receives it: KubeRay's submitter expands $VARS from its own env."""
    (submitter,) = doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
    env = _env(submitter)
    entrypoint = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], doc["spec"]["entrypoint"])
    return shlex.split(entrypoint)


@pytest.mark.parametrize("f,doc", _of_kind("RayJob"), ids=_pair_id)
def test_rayjob(f, doc):
    from cluster.runtime.plan import load_config, make_plan, parse_layer_split

    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["entrypoint"].startswith("python -m cluster.cli batch score ")
    for var in ("$JAMBA_MODEL_DIR", "$INPUT_URI", "$OUTPUT_URI"):
        assert var in spec["entrypoint"]
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    argv = _job_argv(doc)
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["--address"] == "auto"
    cluster = spec["rayClusterSpec"]
    model_dir = opts["--model"]
    for t in _templates(doc):
        _check_model_dir(t, model_dir, need_claim=True)
    stages, pipelines = int(opts["--stages"]), int(opts["--pipelines"])
    gpus = float(opts.get("--gpus-per-stage", 0))
    assert gpus == 1
    pods = _worker_pods(cluster)
    assert sum(p["GPU"] for p in pods) >= stages * pipelines * gpus
    cpus = float(opts["--cpus-per-stage"])
    assert sum(p["CPU"] for p in pods) > stages * pipelines * cpus  # some left for Ray Data's tasks
    preset = {"/models/AI21-Jamba-Mini-1.6": "jamba-mini-1.6", "/models/AI21-Jamba-Large-1.6": "jamba-large-1.6"}[model_dir]
    config = load_config(preset)
    plans = make_plan(config, stages, gpu_memory=PLAN_GPU_MEMORY)
    assert parse_layer_split(opts["--layer-split"], config.num_hidden_layers) == [(p.start, p.end) for p in plans]


@pytest.mark.parametrize("f,doc", _of_kind("RayJob"), ids=_pair_id)
def test_rayjob_entrypoint_parses_with_cluster_batch(f, doc):
    import argparse

    from cluster.cli.batch import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    argv = _job_argv(doc)
    assert argv[:4] == ["python", "-m", "cluster.cli", "batch"]
    args = parser.parse_args(argv[4:])
    assert args.task == "score" and args.address == "auto"


# ---- the image ----------------------------------------------------------------------------------
def test_dockerfile():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (K8S / "Dockerfile").read_text()
    lines = [re.sub(r"\s+", " ", line.strip()) for line in re.sub(r"\\\n", " ", text).splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert all("nvidia/cuda:" in line for line in froms if " AS uv" not in line)
    final = lines[len(lines) - lines[::-1].index(froms[-1]):]  # the runtime stage
    assert "USER 1000:1000" in final or "USER 1000" in final
    assert any(line.startswith("WORKDIR ") for line in final)
    (expose,) = [line for line in final if line.startswith("EXPOSE ")]
    assert {"9000", "8265", "8080"} <= set(expose.split()[1:])
    # torch: the project's pin, the CUDA build from the PyTorch index.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert re.search(r"ARG TORCH_VERSION=" + re.escape(pin.split("==")[1]) + r"\b", text)
    cu = re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu(\d+)\b", text)
    cuda = re.search(r"ARG CUDA_VERSION=(\d+)\.(\d+)\.\d+", text)
    assert cu and cuda and cu.group(1) == "".join(cuda.groups()), "torch's CUDA build and the base image's CUDA differ"
    assert '".[gpu]"' in text
    # Exactly the packages of the two distributions go in (the server's, and the client's with
    # protos/ and its stubs); of weights only the small committed demo checkpoints.
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    packages = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    packages |= set(client["tool"]["setuptools"]["packages"])  # top-level directories
    assert packages == {"stages", "cluster", "client", "protos"}
    assert "uv pip install ./client" in text
    copied = {m.group(1) for m in re.finditer(r"^COPY (\w+)/ \1/$", text, re.M)}
    assert copied == packages
    demo = re.findall(r"^COPY models/(\S+)/ /opt/jamba/models/\1/$", text, re.M)
    assert sorted(demo) == ["jamba-demo-classifier", "jamba-demo-lm"]
    assert "JAMBA_DEMO_MODELS=/opt/jamba/models" in text
    others = [line for line in lines if line.startswith("COPY") and "models/jamba-demo-" not in line]
    assert not re.search(r"safetensors|\.bin\b|models/", "\n".join(others))
    # BuildKit's per-Dockerfile ignore file: everything out, then the sources back in.
    ignore = [line.strip() for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    for package in [*packages, "models/jamba-demo-lm", "models/jamba-demo-classifier"]:
        assert f"!{package}/" in ignore


@pytest.mark.parametrize("f,doc", RAY_WORKLOADS, ids=_pair_id)
def test_node_health_checks_are_set_on_the_head(f, doc):
    """The GCS (on the head) runs Ray's node health checks: a silent node is declared dead in
    about 20 s, not about a minute (README, "A silent host")."""
    env = _env(_ray_container(_cluster_spec(doc)["headGroupSpec"]["template"]))
    assert (env["RAY_health_check_period_ms"], env["RAY_health_check_timeout_ms"],
            env["RAY_health_check_failure_threshold"]) == ("2000", "2000", "5")
