"""Running a study on a Ray cluster: configs, ``python -m study.submit``, and a real local cluster.

The slow tests start a real two-node Ray cluster on this host (two ``ray start --block``
processes with their own ports, token authentication on, every listener on 127.0.0.1),
an S3-compatible server on loopback (moto), and submit studies through the Jobs API.
The cluster and the S3 server are shared by the slow tests of this module (start-up
is the expensive part); the last test kills the worker node.

Loopback only: the head runs the guide's recipe (cluster/README.md), Ray's stock ``ray start``
with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``--node-ip-address=127.0.0.1``, which keeps
every listener on 127.0.0.1 (without them Ray replaces 127.0.0.1 by the machine's outward
address); the worker joins through ``_RAY_WORKER_CLI`` (that recipe refuses a second node).
The last test ends the head the guide's way: SIGTERM to its ``ray start --block`` process.
Nothing here talks to a non-loopback address.
"""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]
BUCKET = "colorize-test"


# ====================================================================== configs (fast)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strings(obj):
    """Every string in a parsed YAML document (values and keys)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _study_commands(text: str) -> list[list[str]]:
    """Every ``python -m <module> ...`` command in a config or guide, as [module, *args]."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)  # shell line continuations, also in comments
    cmds = []
    for line in text.splitlines():
        for m in re.finditer(r"python3? -m [\w.]+", line):
            rest = line[m.start():].split("`")[0]
            try:
                words = shlex.split(rest)
            except ValueError:
                words = rest.split()
            cut = next((i for i, w in enumerate(words) if w in ("&&", "||", ";", "|", "#")), len(words))
            cmds.append(words[2:cut])
    return cmds


def _kinds(docs):
    return {d.get("kind") for d in docs}


def test_configs_parse():
    for path in CONFIGS:
        docs = _docs(path)
        assert docs, path
    aws = _docs(CLUSTER / "aws.yaml")[0]
    assert aws["provider"]["type"] == "aws"
    head = aws["head_node_type"]
    gpu_workers = [t for n, t in aws["available_node_types"].items() if n != head and (
        t["node_config"]["InstanceType"][0] in "gp" or t.get("resources", {}).get("GPU"))]
    assert gpu_workers, "a GPU worker type"
    assert 0 <= gpu_workers[0]["min_workers"] <= gpu_workers[0]["max_workers"]
    assert aws["available_node_types"][head]["resources"].get("CPU") == 0  # the head takes no trials
    assert "RayCluster" in _kinds(_docs(CLUSTER / "kuberay" / "raycluster.yaml"))
    job = [d for d in _docs(CLUSTER / "kuberay" / "rayjob.yaml") if d["kind"] == "RayJob"][0]
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in json.dumps(g) for g in groups), "a GPU worker group"


def test_aws_config_passes_rays_own_validation():
    """Ray's launcher fills the defaults and validates against its schema (no cloud call)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_docs(CLUSTER / "aws.yaml")[0])
    validate_config(config)


def test_config_commands_exist_in_this_project():
    """Every `python -m X` in the configs and the guide is a module here, with flags its parser takes."""
    from study.run import parser as run_parser
    from study.space.parse import SPACES_DIR
    from study.submit import parser as submit_parser

    runs = 0
    for path in CONFIGS + [CLUSTER / "README.md"]:
        for module, *args in _study_commands(path.read_text()):
            if module in ("pip", "venv") or "--help" in args:
                continue
            spec = importlib.util.find_spec(module)
            assert spec is not None, f"{path.name}: python -m {module}"
            if spec.submodule_search_locations is not None:  # a package runs its __main__
                assert importlib.util.find_spec(f"{module}.__main__"), f"{path.name}: python -m {module}"
            if module == "study.run":
                runs += 1
                ns = run_parser().parse_args(args)  # SystemExit on a flag study.run does not take
                assert (SPACES_DIR / f"{ns.space}.yaml").exists(), f"{path.name}: --space {ns.space}"
                if path.suffix == ".yaml":
                    assert "://" in ns.storage, f"{path.name}: a cluster needs shared --storage, got {ns.storage}"
            elif module == "study.submit":
                ns = submit_parser().parse_args(args)
                run_args = ns.run_args[1:] if ns.run_args[:1] == ["--"] else ns.run_args
                if run_args:
                    run_parser().parse_args(run_args)
    assert runs >= 1
    job = [d for d in _docs(CLUSTER / "kuberay" / "rayjob.yaml") if d["kind"] == "RayJob"][0]
    module, *args = _study_commands(job["spec"]["entrypoint"])[0]
    ns = run_parser().parse_args(args)
    assert module == "study.run" and ns.space == "full" and ns.storage.startswith("s3://") and ns.address == "auto"


def test_launcher_commands_are_valid_shell():
    aws = _docs(CLUSTER / "aws.yaml")[0]
    for key in ("setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in aws[key]:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, (key, cmd, r.stderr)
    start = " ".join(aws["head_start_ray_commands"] + aws["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert any("torch==2.14.1" in c and "torchvision==0.29.1" in c for c in aws["setup_commands"])
    assert any(re.search(r"pip install -q -e \S*colorize\[postgres\]", c) for c in aws["setup_commands"])


def test_launcher_token_follows_rays_vm_guidance(tmp_path):
    """Mode in the shell profile, token in ~/.ray/auth_token with mode 600, never in a command line.

    The setup commands run here for real with HOME in a temporary folder and `boto3` replaced by
    a stand-in module that returns a token, so the profile and the file they leave are checked.
    """
    aws = _docs(CLUSTER / "aws.yaml")[0]
    start = " ".join(aws["head_start_ray_commands"] + aws["worker_start_ray_commands"])
    assert "RAY_AUTH_TOKEN" not in start  # the token is in no process's environment or arguments
    token_cmds = [c for c in aws["setup_commands"] if "auth_token" in c or ".bashrc" in c]
    assert len(token_cmds) == 2
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "boto3.py").write_text(
        "class _C:\n    def get_parameter(self, Name, WithDecryption):\n"
        "        assert Name == '/colorize/ray-auth-token' and WithDecryption\n"
        "        return {'Parameter': {'Value': 'tok' * 8}}\n"
        "def client(name, region_name=None):\n    return _C()\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(fake), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    for _ in range(2):  # a second `ray up` re-runs the setup: nothing doubles
        for cmd in token_cmds:
            r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
            assert r.returncode == 0, (cmd, r.stderr)
    assert (home / ".bashrc").read_text().splitlines() == ["export RAY_AUTH_MODE=token"]
    token = home / ".ray" / "auth_token"
    assert token.read_text().strip() == "tok" * 8
    assert token.stat().st_mode & 0o777 == 0o600 and (home / ".ray").stat().st_mode & 0o077 == 0


def test_launcher_mounts_only_the_sources():
    aws = _docs(CLUSTER / "aws.yaml")[0]
    mounts = aws["file_mounts"]
    assert "." not in mounts.values() and "./" not in mounts.values()
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), local
        assert not any(part in (".venv", "studies", ".cache", ".git") for part in Path(local).parts), local
    # what `pip install -e` needs (pyproject names README.md as the readme) and what runs
    assert {Path(v).name for v in mounts.values()} >= {"pyproject.toml", "README.md", "study", "analysis",
                                                       "search_spaces"}


def test_images_ship_cuda_once():
    """Ray's CPU images (no CUDA of their own) under torch's CUDA 13 wheels, and GPUs handed to the workers."""
    aws = _docs(CLUSTER / "aws.yaml")[0]
    images = [v for k, v in aws["docker"].items() if k.endswith("image")]
    assert images and all(i.endswith("-cpu") for i in images), images
    assert "--gpus all" in aws["docker"]["worker_run_options"]
    froms = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert froms and all(f.endswith("-cpu") for f in froms), froms
    for path in (CLUSTER / "aws.yaml", CLUSTER / "README.md", CLUSTER / "Dockerfile"):
        assert re.search(r"driver\D{0,20}>= ?580", path.read_text()), f"{path.name}: the NVIDIA driver needed"


def _dashboard_hosts(path: Path) -> list[str]:
    text = path.read_text()
    hosts = re.findall(r"--dashboard-host[= ]([\w.:]+)", text)
    for doc in _docs(path):
        for spec in _ray_start_params(doc):
            if "dashboard-host" in spec:
                hosts.append(str(spec["dashboard-host"]))
    return hosts


def _ray_start_params(doc):
    spec = doc.get("spec") or {}
    spec = spec.get("rayClusterSpec", spec)
    if "headGroupSpec" in spec:
        yield spec["headGroupSpec"].get("rayStartParams") or {}


def test_configs_bind_dashboard_to_loopback_and_enable_token_auth():
    for path in (CLUSTER / "aws.yaml", CLUSTER / "kuberay" / "raycluster.yaml"):
        hosts = _dashboard_hosts(path)
        assert hosts and set(hosts) == {"127.0.0.1"}, f"{path.name}: dashboard hosts {hosts}"
    # The RayJob's dashboard must answer the KubeRay operator (it polls the job over the pod
    # network), so it listens on the pod address, but only behind token auth, a ClusterIP
    # service and a NetworkPolicy that admits the cluster's own pods and the operator.
    job_docs = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    job = [d for d in job_docs if d["kind"] == "RayJob"][0]
    hosts = _dashboard_hosts(CLUSTER / "kuberay" / "rayjob.yaml")
    assert set(hosts) <= {"127.0.0.1", "0.0.0.0"}
    if set(hosts) != {"127.0.0.1"}:
        policies = [d for d in job_docs if d["kind"] == "NetworkPolicy"]
        assert policies and all(p["spec"].get("ingress") for p in policies)
        assert "Ingress" in policies[0]["spec"]["policyTypes"]
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress")
    for path in CONFIGS:
        text = path.read_text()
        docs = _docs(path)
        token_on = ("RAY_AUTH_MODE=token" in text
                    or any(d.get("spec", {}).get("authOptions", {}).get("mode") == "token" for d in docs)
                    or any(d.get("spec", {}).get("rayClusterSpec", {}).get("authOptions", {}).get("mode") == "token"
                           for d in docs)
                    or re.search(r"name: RAY_AUTH_MODE\s+value: ['\"]?token", text))
        assert token_on, f"{path.name}: token authentication"


def test_aws_config_keeps_ray_ports_closed():
    aws = _docs(CLUSTER / "aws.yaml")[0]
    text = (CLUSTER / "aws.yaml").read_text()
    rules = aws["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        for port in (6379, 8265, 10001):
            assert not (public and (lo == -1 or lo <= port <= hi)), f"port {port} open to the internet: {rule}"
    assert "--dashboard-host=0.0.0.0" not in text


CREDENTIAL_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                          # AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]\s*\S+",
    r"(?i)aws_access_key_id\s*[:=]\s*\S+",
    r"(?i)secret_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-f]{16,}",
    r"(?i)auth_token['\"]?\s*[:=]\s*['\"]?[0-9a-f]{16,}",
    r"(?i)password\s*[:=]\s*['\"]?\w{6,}",
]


def test_configs_hold_no_credentials():
    for path in CONFIGS + [CLUSTER / "README.md"]:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not re.search(pattern, text), f"{path.name} matches {pattern}"
    for path in CONFIGS:
        for doc in _docs(path):
            if doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"{path.name}: a Secret with values"
            for s in _strings(doc):
                assert not re.fullmatch(r"[0-9a-f]{64}", s), f"{path.name}: a token-like value"
    # Token values come from the environment or the platform's secret store, never from the YAML.
    raycluster = (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert "secretKeyRef" in raycluster or "authOptions" in raycluster


# ====================================================================== KubeRay CRD schemas (fast)

CRD_SCHEMAS = ROOT / "tests" / "data" / "kuberay"
KUBERAY = "v1.5.1"   # the oldest KubeRay the manifests support (authOptions); see tests/data/kuberay/README.md


def _structural(schema):
    """A CRD's OpenAPI schema as JSON Schema that rejects unknown fields, as the API server prunes them.

    Kubernetes silently drops a field a structural schema does not name, so a typo ("rayStartParam",
    "resource") would be lost without an error; here it is an error. Objects that preserve unknown
    fields, or that list no properties (free-form maps), stay open.
    """
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({n: _structural(v) for n, v in val.items()} if k == "properties" else _structural(val))
           for k, val in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_validator(kind: str):
    import jsonschema

    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    raw = json.loads(gzip.decompress((CRD_SCHEMAS / f"{plural}-{KUBERAY}.schema.json.gz").read_bytes()))
    return jsonschema.Draft7Validator(_structural(raw))


def _crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _crd_validator(doc["kind"]).iter_errors(doc)]


def _ray_resources(path: Path) -> list[dict]:
    return [d for d in _docs(path) if d.get("apiVersion") == "ray.io/v1"]


def test_manifests_match_the_kuberay_crd_schemas():
    """Every RayCluster/RayJob here validates against KubeRay's own CRD schema, unknown fields rejected."""
    checked = set()
    for path in CONFIGS[1:]:
        for doc in _ray_resources(path):
            assert _crd_errors(doc) == [], f"{path.name}: {doc['kind']}"
            checked.add(doc["kind"])
    assert checked == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("typo", [
    ("rayStartParams", "rayStartParam"),          # a misspelt field
    ("resources", "resource"),                     # inside the pod template
    ("authOptions", "authOption"),
    ("serviceType", "servicetype"),
])
def test_a_typo_in_a_manifest_fails_the_schema_check(typo):
    right, wrong = typo
    for path in CONFIGS[1:]:
        for doc in _ray_resources(path):
            text = json.dumps(doc)
            assert f'"{right}"' in text, (path.name, right)
            bad = json.loads(text.replace(f'"{right}"', f'"{wrong}"', 1))
            errors = _crd_errors(bad)
            assert any(wrong in e for e in errors), (path.name, wrong, errors)


def test_crd_schema_checks_values_too():
    doc = copy.deepcopy(_ray_resources(CLUSTER / "kuberay" / "raycluster.yaml")[0])
    doc["spec"]["authOptions"]["mode"] = "tokens"                      # not one of the enum's values
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "1"               # a string where an integer goes
    errors = _crd_errors(doc)
    assert any("authOptions.mode" in e for e in errors) and any("replicas" in e for e in errors), errors


# ====================================================================== KubeRay pods (fast)

# What a node type offers pods (EKS: capacity less kube-reserved and the eviction threshold), less
# a margin for the DaemonSets (CNI, kube-proxy, NVIDIA device plugin, log agent). The guide names it.
GIB = 2**30
NODE_ALLOCATABLE = {"g5.2xlarge": {"cpu": 7.9 - 0.4, "memory": 29.5 * GIB - 1 * GIB, "nvidia.com/gpu": 1}}


def _quantity(v) -> float:
    v = str(v)
    for suffix, f in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if v.endswith(suffix):
            return float(v[: -len(suffix)]) * f
    return float(v)


def _pod_groups(doc: dict):
    """(name, pod template spec, rayStartParams) of the head and every worker group of a RayCluster/RayJob."""
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    yield "head", spec["headGroupSpec"]["template"]["spec"], spec["headGroupSpec"].get("rayStartParams") or {}
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"], g.get("rayStartParams") or {}


def _pod_templates(doc: dict):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_worker_pods_fit_the_node_type_they_name():
    for path in CONFIGS[1:]:
        for doc in _ray_resources(path):
            groups = [(n, pod) for n, pod, _ in _pod_groups(doc) if n != "head"]
            assert groups
            for name, pod in groups:
                node = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
                assert node in NODE_ALLOCATABLE, f"{path.name}/{name}: name a node type the sizes were made for"
                requests = {}
                for c in pod["containers"]:
                    for k, v in c["resources"]["requests"].items():
                        requests[k] = requests.get(k, 0) + _quantity(v)
                    limits = c["resources"].get("limits", {})
                    assert limits.get("memory") == c["resources"]["requests"]["memory"], "memory limit = request"
                for k, have in NODE_ALLOCATABLE[node].items():
                    assert 0 < requests.get(k, 0) <= have, f"{path.name}/{name}: {k} {requests.get(k)} > {have}"
                assert node in (CLUSTER / "README.md").read_text()


def test_head_and_workers_have_separate_service_accounts():
    """KubeRay binds the autoscaler's Role to the head's account; trial code (workers) gets none of it."""
    for path in CONFIGS[1:]:
        docs = _docs(path)
        accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
        for doc in _ray_resources(path):
            used = {n: pod.get("serviceAccountName") for n, pod, _ in _pod_groups(doc)}
            head = used.pop("head")
            assert head in accounts and used and all(a in accounts for a in used.values()), (path.name, used)
            assert head not in used.values(), f"{path.name}: workers share the head's account"
            for name, pod, _ in _pod_groups(doc):
                if name != "head":  # no Kubernetes API token where trial code runs
                    assert pod.get("automountServiceAccountToken") is False
                    assert accounts[pod["serviceAccountName"]].get("automountServiceAccountToken") is False


def test_manifests_are_independent():
    """Applying or deleting one manifest never touches an object of the other."""
    def objects(path):
        return {(d["kind"], d["metadata"]["name"]) for d in _docs(path)}

    def labels(path):
        return {pod.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")
                for d in _ray_resources(path) for pod in _pod_templates(d)}

    a, b = CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"
    assert not objects(a) & objects(b), objects(a) & objects(b)
    assert not labels(a) & labels(b)   # neither NetworkPolicy selects the other's pods


def test_pods_have_a_memory_backed_dev_shm():
    for path in CONFIGS[1:]:
        for doc in _ray_resources(path):
            for name, pod, _ in _pod_groups(doc):
                volumes = {v["name"]: v for v in pod.get("volumes", [])}
                for c in pod["containers"]:
                    mount = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
                    assert mount, f"{path.name}/{name}: /dev/shm"
                    vol = volumes[mount[0]["name"]]["emptyDir"]
                    assert vol["medium"] == "Memory"
                    # room for Ray's object store (30% of the memory limit), within the limit itself
                    memory = _quantity(c["resources"]["limits"]["memory"])
                    assert 0.3 * memory < _quantity(vol["sizeLimit"]) < memory, (path.name, name)


def test_kuberay_older_than_1_5_1_is_not_offered():
    """authOptions needs KubeRay >= 1.5.1; the manual fallback missed the autoscaler, so there is none."""
    for path in CONFIGS[1:] + [CLUSTER / "README.md"]:
        text = path.read_text()
        assert ">= 1.5.1" in text, path.name
        # no recipe for a hand-made token Secret (the old fallback, which missed the autoscaler)
        assert "create secret generic" not in text and "replace `authOptions`" not in text, path.name
        if path.suffix == ".yaml":  # the token only through authOptions, never set by hand
            assert "secretKeyRef" not in text and "RAY_AUTH_TOKEN\n" not in text, path.name
    for path in CONFIGS[1:]:
        for doc in _ray_resources(path):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert spec["authOptions"]["mode"] == "token"


# ====================================================================== study.submit (fast)


def test_entrypoint_and_runtime_env():
    from study import submit

    uri = "s3://bucket/studies?endpoint_override=h:1&scheme=http"
    cmd = submit.entrypoint(["--", "--space", "full", "--storage", uri])
    assert shlex.split(cmd) == ["python", "-m", "study.run", "--space", "full", "--storage", uri, "--address", "auto"]
    assert "--address auto" not in submit.entrypoint(["--space", "smoke", "--storage", "/nfs/s", "--address", "x:1"])
    with pytest.raises(submit.SubmitError, match="relative"):
        submit.entrypoint(["--space", "smoke", "--storage", "studies"])
    with pytest.raises(submit.SubmitError, match="not valid"):
        submit.entrypoint(["--space", "smoke", "--no-such-flag"])
    env = submit.runtime_env(ROOT, {"COLORIZE_DATA_ROOT": "/data"})
    assert env["working_dir"] == str(ROOT)
    for pattern in (".venv", ".cache", "studies", ".git"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["COLORIZE_DATA_ROOT"] == "/data"
    with pytest.raises(submit.SubmitError, match="credentials"):
        submit.runtime_env(ROOT, {"RAY_AUTH_TOKEN": "x"})
    with pytest.raises(submit.SubmitError, match="credentials"):
        submit.runtime_env(ROOT, {"AWS_SECRET_ACCESS_KEY": "x"})


def test_token_comes_from_the_environment(tmp_path):
    from study import submit

    home = tmp_path / "home"
    assert submit.auth_token({}, home=home) is None
    assert submit.auth_token({"RAY_AUTH_TOKEN": " abc \n"}, home=home) == "abc"
    f = tmp_path / "token"
    f.write_text("fromfile\n")
    assert submit.auth_token({"RAY_AUTH_TOKEN_PATH": str(f)}, home=home) == "fromfile"
    with pytest.raises(submit.SubmitError, match="inside the project"):
        submit.auth_token({"RAY_AUTH_TOKEN_PATH": str(ROOT / "token.txt")}, home=home)
    assert submit.auth_headers("abc") == {"Authorization": "Bearer abc"}
    assert submit.auth_headers(None) == {}
    assert submit.is_loopback("http://127.0.0.1:8265") and submit.is_loopback("localhost:8265")
    assert not submit.is_loopback("http://10.0.0.5:8265")


def test_token_follows_rays_order_down_to_its_default_file(tmp_path):
    """Ray's clients look in $RAY_AUTH_TOKEN, then $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; so does submit."""
    from study import submit

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("default\n")
    f = tmp_path / "token"
    f.write_text("fromfile\n")
    assert submit.find_token({}, home=home) == ("default", f"~/.ray/auth_token ({home / '.ray' / 'auth_token'})")
    assert submit.find_token({"HOME": str(home)}) == submit.find_token({}, home=home)
    assert submit.find_token({"RAY_AUTH_TOKEN_PATH": str(f)}, home=home)[0] == "fromfile"
    assert submit.find_token({"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(f)}, home=home) == \
        ("env", "$RAY_AUTH_TOKEN")
    # a named file that is missing or empty is a mistake (Ray aborts too), not a silent fall-back
    with pytest.raises(submit.SubmitError, match="cannot read the token file"):
        submit.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)
    f.write_text("\n")
    with pytest.raises(submit.SubmitError, match="is empty"):
        submit.find_token({"RAY_AUTH_TOKEN_PATH": str(f)}, home=home)
    (home / ".ray" / "auth_token").write_text("")
    assert submit.find_token({}, home=home) == (None, None)


def test_submit_cli_help():
    r = subprocess.run([sys.executable, "-m", "study.submit", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--follow" in r.stdout and "RAY_AUTH_TOKEN" in r.stdout


def test_submit_cli_refuses_before_uploading(capsys, monkeypatch):
    from study import submit

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.main(["--address", "http://127.0.0.1:9", "--", "--space", "smoke", "--storage", "rel"]) == 2
    assert "relative" in capsys.readouterr().err
    assert submit.main(["--address", "http://127.0.0.1:9"]) == 2


# ====================================================================== a real local cluster (slow)

# The head: Ray's stock CLI, as the guide's loopback recipe runs it.
RAY = str(Path(sys.executable).parent / "ray")
# A worker: Ray refuses to add a node to a cluster when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the
# guide's loopback recipe is for one node), so this test-only CLI computes Ray's constants
# before setting it, and pins the node-address lookup to 127.0.0.1.
_RAY_WORKER_CLI = (
    "import os, sys\n"
    "import ray._private.ray_constants\n"
    "import ray._private.services as services\n"
    "services.get_node_ip_address = lambda address=None: '127.0.0.1'\n"
    "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)
MARKER = "COLORIZE_TEST_CLUSTER"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _free_range(width: int = 64) -> tuple[int, int]:
    """A block of ports below the ephemeral range that nothing listens on now (worker ports)."""
    for _ in range(50):
        lo = random.randrange(20000, 30000 - width)
        try:
            socks = []
            for p in range(lo, lo + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return lo, lo + width - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class LocalCluster:
    """A head and a worker node on this host, each a `ray start --block` process we own."""

    def __init__(self, token: str, env: dict[str, str]):
        self.token = token
        self.tmp = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp"))  # short: Ray's socket paths
        self.marker = self.tmp.name
        (self.tmp / "tmp").mkdir()
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    MARKER: self.marker, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # with --node-ip-address: all on loopback
                    "TMPDIR": str(self.tmp / "tmp"),  # the nodes' temporary files go away with the cluster
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    # Notice a dead node within seconds (defaults: 3 s x 5 checks).
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(k, None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.gcs_port = self.dashboard_port = None

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        env = {**self.env, **(extra_env or {})}
        if name == "head":
            cli = [RAY]
        else:  # the variable must be unset while Ray reads its constants (see _RAY_WORKER_CLI)
            cli = [sys.executable, "-c", _RAY_WORKER_CLI]
            env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        proc = subprocess.Popen([*cli, "start", "--block", "--node-ip-address=127.0.0.1", *args],
                                cwd=self.tmp, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _node_args(self, name: str, cpus: int) -> list[str]:
        agent, grpc, renv, metrics = _free_ports(4)
        lo, hi = _free_range()
        # Each node its own temp dir, as on separate machines (nodes sharing one would unpack
        # the job's working_dir into the same folder, each under the other's feet).
        return [f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={self.tmp / name}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
                f"--min-worker-port={lo}", f"--max-worker-port={hi}",
                f"--memory={3 * 2**30}", f"--object-store-memory={150 * 2**20}"]

    def start_head(self, cpus: int = 1, timeout: float = 90):
        self.gcs_port, self.dashboard_port, client, dash_metrics, as_metrics = _free_ports(5)
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client}",
                             *self._node_args("head", cpus)],
                    {"DASHBOARD_METRIC_PORT": str(dash_metrics), "AUTOSCALER_METRIC_PORT": str(as_metrics)})
        self._wait_nodes(1, "head", timeout)

    def add_worker(self, cpus: int = 1, timeout: float = 90, tries: int = 2):
        for attempt in range(tries):
            self._start("worker", [f"--address=127.0.0.1:{self.gcs_port}", "--resources={\"worker_node\": 1}",
                                   *self._node_args("worker", cpus)])
            try:
                self._wait_nodes(2, "worker", timeout)
                return
            except RuntimeError:
                self.kill("worker")
                if attempt == tries - 1:
                    raise

    def request(self, path: str, token: str | None = "own", method: str = "GET", **kw):
        import requests

        headers = {} if token is None else {"Authorization": f"Bearer {self.token if token == 'own' else token}"}
        return requests.request(method, self.dashboard + path, headers=headers, timeout=10, **kw)

    def alive_nodes(self) -> list[dict]:
        r = self.request("/api/v0/nodes")
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def _wait_nodes(self, n: int, name: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log(name)[-3000:]}")
            try:
                if self.dashboard_port and len(self.alive_nodes()) >= n:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1)
        raise RuntimeError(f"{name} did not join in {timeout} s: {self.log(name)[-3000:]}")

    def node_id(self, head: bool) -> str:
        return [n["node_id"] for n in self.alive_nodes() if n["is_head_node"] == head][0]

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill(self, name: str):
        """SIGKILL a node: its `ray start` process and everything under it (a crashed machine)."""
        psutil = _psutil()

        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            victims = []
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        for v in victims:
            with _suppress():
                v.kill()
        psutil.wait_procs(victims, timeout=10)
        proc.wait(timeout=10)

    def stop(self):
        try:
            for name in list(self.procs):
                with _suppress():
                    self.kill(name)
            # Anything our nodes started that left both trees (carries our marker in its environment).
            psutil = _psutil()
            strays = []
            for p in psutil.process_iter():
                with _suppress():
                    if p.pid != os.getpid() and p.environ().get(MARKER) == self.marker:
                        p.kill()
                        strays.append(p)
            psutil.wait_procs(strays, timeout=10)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _psutil():
    import psutil
    import ray  # noqa: F401 - Ray puts its vendored psutil on sys.path

    return psutil


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, a bucket, and fake credentials for this process and the nodes."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = _free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "client": client, "env": env,
               "query": f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(k, None)  # this process is a client that brings its token explicitly
    c = LocalCluster(secrets.token_hex(32), s3["env"])
    try:
        t0 = time.monotonic()
        c.start_head()
        c.add_worker()
        c.started_in = time.monotonic() - t0
        yield c
    finally:
        c.stop()


def _storage(s3) -> str:
    return f"s3://{BUCKET}/studies?{s3['query']}"


def _study_root(s3, name: str) -> str:
    return f"s3://{BUCKET}/studies/{name}?{s3['query']}"


def _check_epochs(trials, epochs, n_epochs: int | None = None):
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for t in trials.itertuples():
        got = sorted(epochs[epochs.trial_id == t.trial_id].epoch)
        assert got == list(range(1, t.epochs_run + 1)), (t.trial_id, got)
        if t.status == "DONE" and n_epochs is not None:
            assert t.epochs_run == n_epochs, (t.trial_id, t.epochs_run)


@pytest.mark.slow
def test_dashboard_on_loopback_only_and_token_required(cluster):
    psutil = _psutil()

    from study import submit

    listeners = [c for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == cluster.dashboard_port]
    assert listeners and {c.laddr.ip for c in listeners} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listeners
    assert cluster.request("/", token=None).status_code == 200          # the page loads (it asks for the token)
    assert cluster.request("/api/version", token=None).status_code == 401
    assert cluster.request("/api/version", token="0" * 64).status_code == 403
    assert cluster.request("/api/version").status_code == 200
    r = cluster.request("/api/jobs/", token=None, method="POST", json={"entrypoint": "echo pwned"})
    assert r.status_code == 401
    assert cluster.request("/api/jobs/").json() == []                    # nothing was submitted
    with pytest.raises(submit.SubmitError, match="RAY_AUTH_TOKEN"):
        submit.client(cluster.dashboard, token=None)
    with pytest.raises(submit.SubmitError, match="not this cluster's"):
        submit.client(cluster.dashboard, token="0" * 64)
    # every Ray listener of our nodes is on loopback
    ours = set()
    for proc in cluster.procs.values():
        p = psutil.Process(proc.pid)
        ours |= {q.pid for q in [p, *p.children(recursive=True)]}
    bad = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours
           and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not bad, bad


@pytest.mark.slow
def test_smoke_study_as_a_job_on_two_nodes_with_s3_storage(cluster, s3, capsys, monkeypatch):
    """`python -m study.submit --follow -- --space smoke --storage s3://...` on the two-node cluster."""
    import pandas as pd

    from study import submit
    from study.results.store import read_json, read_table

    t0 = time.monotonic()
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)       # the CLI's only source of the token
    rc = submit.main(["--address", cluster.dashboard, "--follow", "--env",
                      f"COLORIZE_CACHE_DIR={cluster.tmp / 'cache'}", "--",
                      "--space", "smoke", "--name", "smoke2n", "--storage", _storage(s3),
                      "--max-concurrent", "2", "--cpus-per-trial", "1"])
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\S+):", out).group(1)
    assert rc == 0 and f"job {job}: SUCCEEDED" in out, out[-4000:]
    assert "dashboard: http://127.0.0.1:" in out and "ssh -N -L" in out
    assert "study smoke2n: space smoke, 6 trials" in out and "best configuration" in out  # the followed logs
    root = _study_root(s3, "smoke2n")
    assert read_json(root, "study.json")["space"] == "smoke"
    trials, epochs = read_table(root, "trials"), read_table(root, "epochs")
    assert len(trials) == 6
    assert set(trials.status) <= {"DONE", "PRUNED"}, trials[["trial_id", "status", "error"]]
    nodes = {cluster.node_id(head=True), cluster.node_id(head=False)}
    assert set(trials.node_id) == nodes, (set(trials.node_id), nodes)   # both nodes took trials
    _check_epochs(trials, epochs, n_epochs=3)
    assert (trials.device == "cpu").all()
    # Everything is in the bucket: the tables, the study record, every best checkpoint.
    keys = {o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="studies/smoke2n/") for o in page.get("Contents", [])}
    for table in ("trials", "epochs"):  # one file, or a folder of parts (the results writer's choice)
        name = f"studies/smoke2n/results/{table}.parquet"
        assert name in keys or any(k.startswith(name + "/") for k in keys), table
    assert any(k.startswith("studies/smoke2n/results/previews.parquet/") for k in keys)   # its parts
    for t in trials.itertuples():
        assert t.checkpoint_path and not t.checkpoint_path.startswith(("/", "s3:")), t.checkpoint_path
        assert f"studies/smoke2n/{t.checkpoint_path}/checkpoint.pt" in keys, t.checkpoint_path
    # Readers need only pandas + pyarrow: the Parquet read straight from the bucket.
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/studies/smoke2n/results/trials.parquet?{s3['query']}")
    direct = pd.read_parquet(path, filesystem=fs)
    assert sorted(direct.trial_id) == sorted(trials.trial_id)
    print(f"\ncluster started in {cluster.started_in:.0f} s; smoke study job {job} took "
          f"{time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_worker_node_killed_mid_study(cluster, s3, tmp_path):
    """Kill the worker node while it trains: the trial resumes from its checkpoint on the head."""
    from study import submit
    from study.results.store import read_table

    # Two trials at once, one per node (1 CPU each); epochs long enough to kill one mid-trial.
    n_epochs = 6
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    space.update(num_samples=2, max_concurrent=2, pruner={"name": "none"}, description="test: node loss")
    space["params"].update(epochs=n_epochs, train_limit=384)
    space_file = tmp_path / "nodeloss.yaml"
    space_file.write_text(yaml.safe_dump(space))
    root = _study_root(s3, "nodeloss")
    head_id, worker_id = cluster.node_id(head=True), cluster.node_id(head=False)

    t0 = time.monotonic()
    job = submit.submit(["--space", str(space_file), "--name", "nodeloss", "--storage", _storage(s3),
                         "--max-concurrent", "2", "--cpus-per-trial", "1"],
                        address=cluster.dashboard, token=cluster.token,
                        job=submit.Job(env_vars={"COLORIZE_CACHE_DIR": str(cluster.tmp / "cache")}))
    c = submit.client(cluster.dashboard, cluster.token)
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline:
        assert str(c.get_job_status(job)) not in submit.TERMINAL, c.get_job_logs(job)[-4000:]
        try:
            trials = read_table(root, "trials")
        except Exception:  # noqa: BLE001 - moto (not S3) may serve an object while it is replaced
            trials = None
        if trials is not None:
            running = trials[(trials.status == "RUNNING") & (trials.node_id == worker_id)
                             & (trials.epochs_run >= 1) & (trials.epochs_run <= n_epochs - 2)]
            if len(running):
                victim, epochs_at_kill = running.trial_id.iloc[0], int(running.epochs_run.iloc[0])
                break
        time.sleep(0.25)
    assert victim, "no trial ran on the worker node"
    cluster.kill("worker")
    status = submit.wait(job, address=cluster.dashboard, token=cluster.token, timeout_s=300, poll_s=1)
    logs = c.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert [n["node_id"] for n in cluster.alive_nodes()] == [head_id]   # the worker is gone for good

    trials, epochs = read_table(root, "trials"), read_table(root, "epochs")
    assert len(trials) == 2 and set(trials.status) == {"DONE"}, trials[["trial_id", "status", "error"]]
    _check_epochs(trials, epochs, n_epochs=n_epochs)                 # nothing lost, nothing twice
    row = trials.set_index("trial_id").loc[victim]
    assert row.node_id == head_id                                    # finished on the surviving node
    # ...from its checkpoint, not from scratch: the trial's own log on the head says so.
    resumed = _resume_lines(cluster, victim)
    assert resumed, f"no 'resumed from' line for {victim}"
    # (the trial may have finished an epoch or two between our read of the table and the kill)
    assert 1 <= max(resumed) <= epochs_at_kill + 2, (resumed, epochs_at_kill)
    print(f"\nkilled the worker while {victim} had {epochs_at_kill} epochs; resumed after epoch "
          f"{max(resumed)}; job took {time.monotonic() - t0:.0f} s")


def _resume_lines(cluster, trial_id: str) -> list[int]:
    """'after epoch N' of every resume of ``trial_id`` in the nodes' worker logs."""
    found = []
    for out in cluster.tmp.glob("*/session_latest/logs/worker-*.out"):
        err = out.with_suffix(".err")
        text = out.read_text(errors="replace")
        # the trial's actor names it (its id) in its log's header or in the checkpoint path it resumed from
        if trial_id not in text + (err.read_text(errors="replace") if err.exists() else ""):
            continue
        found += [int(n) for n in re.findall(r"resumed from .* after epoch (\d+)", text)]
    return found


@pytest.mark.slow
def test_stop_recipe_ends_exactly_this_node(cluster):
    """The guide's stop recipe: SIGTERM to the node's `ray start --block` ends everything it started.

    (Runs last: it stops the shared cluster's head. `ray stop` would end every Ray process on
    the machine by name, other users' included; this touches one process id.)
    """
    psutil = _psutil()

    def ours():
        found = []
        for p in psutil.process_iter():
            with _suppress():
                if p.environ().get(MARKER) == cluster.marker:
                    found.append(p)
        return found

    assert "worker" not in cluster.procs or cluster.kill("worker") is None   # the head alone
    head = cluster.procs.pop("head")
    before = ours()
    assert len(before) >= 5, before                   # GCS, raylet, dashboard, agents, ...
    os.kill(head.pid, signal.SIGTERM)                 # kill "$(cat ray-head.pid)"
    head.wait(timeout=60)
    _, alive = psutil.wait_procs(before, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert not ours()
