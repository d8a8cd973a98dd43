"""Every shipped file in ``cluster/`` against the code that reads it (STYLE 5).

Fast and offline: nothing here starts Ray, a container or a service. Checked:
the YAML parses; ``ray-cluster.yaml`` passes Ray's own schema and config
preparation; ``runtime_env.yaml`` passes Ray's ``RuntimeEnv`` and merges with
the runtime env ``tuning.run`` gives ``ray.init``; every ``python -m
tuning.run`` command line parses with ``tuning.run.build_parser()`` and names
a shipped search space and created buckets; every variable handed to tuning
is one it documents; no file holds a literal credential; Kubernetes reads
credentials only from Secrets; docker compose creates the buckets and
databases the code and the other files use. The KubeRay manifests are only
parsed and checked here: no Kubernetes runs them.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR
from ray._private.runtime_env.packaging import _get_excludes
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv
from ray.runtime_env.runtime_env import _merge_runtime_env

import heimdall.store.s3 as s3_module
import tuning.run
import tuning.settings
from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from tuning.release.publish import MODELS_BUCKET
from tuning.settings import DATASETS_BUCKET, RAW_IQ_BUCKET
from tuning.study.spaces import available_spaces, load_space

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
EXPECTED = (
    "ray-cluster.yaml", "runtime_env.yaml", "docker-compose.yml", "postgres-init.sql", "env.example",
    "Dockerfile", "Dockerfile.dockerignore",
    "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/secrets.example.yaml",
)
# cluster/.env holds a developer's real credentials (git ignores it): never read it here.
SHIPPED = sorted(p for p in CLUSTER.rglob("*")
                 if p.is_file() and p.name != ".env" and "__pycache__" not in p.parts)
YAML_FILES = [p for p in SHIPPED if p.suffix in (".yaml", ".yml")]

# Names of credentials: environment variables and Kubernetes Secret keys.
CREDENTIAL = re.compile(r"^(?:[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER)[A-Z0-9_]*"
                        r"|auth_token|password)$")
# Read by Ray rather than tuning (RAY_AUTH_MODE is checked against Ray's constant below).
RAY_VARS = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
OTHER_VARS = {"PYTHONUNBUFFERED"}  # Python's own


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))


def _documented_vars() -> set[str]:
    """Variables tuning documents: the settings table, ``run``'s and ``settings``' docstrings, ``S3Settings.from_env``."""
    docs = (tuning.settings.settings_table() + tuning.run.__doc__ + tuning.settings.__doc__
            + s3_module.S3Settings.from_env.__doc__)
    return set(re.findall(r"``?([A-Z][A-Z0-9_]{2,})``?", docs))


def _env_example() -> dict[str, str]:
    """``KEY=value`` lines of env.example, commented-out ones included (value as written)."""
    text = (CLUSTER / "env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.M))


def _env_example_set() -> dict[str, str]:
    """Only the lines that are not commented out."""
    text = (CLUSTER / "env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.M))


def _strings(node: Any) -> Iterator[str]:
    """Every string (keys and values) in parsed YAML."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def _compose_refs() -> set[str]:
    """Variables docker-compose.yml substitutes (``${VAR...}``; ``$$VAR`` is the container's)."""
    return {name for text in _strings(_load("docker-compose.yml"))
            for name in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text)}


def _compose_buckets() -> set[str]:
    return set(_load("docker-compose.yml")["services"]["minio-init"]["environment"]["BUCKETS"].split())


def _bucket(url: str) -> str | None:
    return url[len("s3://"):].split("/")[0] if url.startswith("s3://") else None


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
            for doc in yaml.safe_load_all(p.read_text(encoding="utf-8")) if doc]


def _containers(node: Any) -> Iterator[dict]:
    """Every container spec anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "containers" and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _secrets() -> dict[str, dict[str, str]]:
    """Secret name -> its stringData, from secrets.example.yaml."""
    docs = yaml.safe_load_all((CLUSTER / "kuberay" / "secrets.example.yaml").read_text(encoding="utf-8"))
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d and d.get("kind") == "Secret"}


# -- the files are there and parse ----------------------------------------------------------------


def test_every_expected_file_is_shipped() -> None:
    missing = [name for name in EXPECTED if not (CLUSTER / name).is_file()]
    assert not missing, f"missing from cluster/: {missing}"


def test_gitignore_keeps_cluster_env_out() -> None:
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert "/cluster/.env" in lines or "cluster/.env" in lines


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses_to_mappings(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{_rel(path)}: every document must be a mapping"


# -- Ray cluster launcher -------------------------------------------------------------------------


def test_ray_cluster_passes_rays_schema_and_preparation() -> None:
    config = _load("ray-cluster.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text(encoding="utf-8")))
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it connects
    validate_config(prepared)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["max_workers"] == len(config["provider"]["worker_ips"])


def test_ray_cluster_starts_every_node_with_token_auth() -> None:
    config = _load("ray-cluster.yaml")
    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, f"{key} has no `ray start`"
        for command in starts:
            assert re.search(r"\bRAY_AUTH_MODE=token\b", command), f"{key}: {command!r} lacks RAY_AUTH_MODE=token"
    assert any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def _pip_installs() -> list[tuple[str, str]]:
    """(file, command) of every ``pip install`` in the launcher config and the Dockerfile."""
    config = _load("ray-cluster.yaml")
    commands = [("ray-cluster.yaml", c) for key in config if key.endswith("_commands") for c in config[key]]
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    commands += [("Dockerfile", line) for line in dockerfile.splitlines() if line.startswith("RUN ")]
    return [(where, c) for where, c in commands if "pip install" in c]


def test_every_pip_install_keeps_torch_pinned() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    installs = _pip_installs()
    assert {where for where, _ in installs} == {"ray-cluster.yaml", "Dockerfile"}
    for where, command in installs:
        if re.search(r"\btorch\b", command):
            assert torch_pin in command.split(), f"{where}: {command!r} must install {torch_pin}"
        else:
            assert "-c constraints.txt" in command, f"{where}: {command!r} must use -c constraints.txt"


# -- GPU nodes -------------------------------------------------------------------------------------


def _torch_install() -> str:
    """The launcher's setup command that installs torch."""
    found = [c for c in _load("ray-cluster.yaml")["setup_commands"] if re.search(r"\btorch==", c)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu-box", "cpu-box"])
def test_ray_cluster_installs_the_cuda_torch_only_on_boxes_with_a_gpu(gpu: bool, tmp_path: Path) -> None:
    # The shipped command, run by bash on a stand-in box: a HOME whose venv pip records its arguments,
    # and a PATH with (or without) an nvidia-smi that answers.
    pip = tmp_path / "heimdall-venv" / "bin" / "pip"
    pip.parent.mkdir(parents=True)
    pip.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.args"}\n')
    tools = tmp_path / "tools"
    tools.mkdir()
    if gpu:
        (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    for tool in (pip, tools / "nvidia-smi"):
        if tool.exists():
            tool.chmod(0o755)
    done = subprocess.run(["bash", "-c", _torch_install()], capture_output=True, text=True, timeout=30,
                          env={"HOME": str(tmp_path), "PATH": f"{tools}:/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "pip.args").read_text().split()
    assert "torch==2.13.0" in args
    assert ("--index-url" in args) is not gpu, args  # PyPI's torch is the CUDA build; the CPU build has its index


def test_ray_cluster_head_offers_no_gpu_to_trials() -> None:
    head = " ".join(_load("ray-cluster.yaml")["head_start_ray_commands"])
    assert "--num-gpus=0" in head


def _groups() -> dict[str, dict]:
    cluster = next(doc for _, doc in _k8s_docs() if doc.get("kind") == "RayCluster")
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def test_kuberay_gpu_group_asks_for_gpus_on_the_cuda_image() -> None:
    groups = _groups()
    assert set(groups) == {"cpu", "gpu"}
    gpu, cpu = groups["gpu"], groups["cpu"]
    [worker] = gpu["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    # KubeRay turns the limit into `ray start --num-gpus`; the device plugin needs it as an integer limit.
    assert isinstance(limits.get("nvidia.com/gpu"), int) and limits["nvidia.com/gpu"] >= 1, limits
    assert "num-gpus" not in gpu["rayStartParams"]  # would override the limit's count
    assert gpu["minReplicas"] >= 1, "a study plans from the GPUs present at its start: keep one GPU pod"
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["template"]["spec"].get("tolerations", []))
    [cpu_worker] = cpu["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_worker["resources"]["limits"]
    # The CPU image has the CPU torch (the Dockerfile's default); the GPU group names the CUDA build.
    assert worker["image"] != cpu_worker["image"] and "cuda" in worker["image"], worker["image"]
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "--build-arg TORCH_INDEX_URL=https://pypi.org/simple" in (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    # A GPU pod fits the trials its GPU packs at --gpus-per-worker 0.25 (1 CPU + 0.5 for reads each).
    from tuning.study.tune import StudyConfig, plan_study

    pod = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    plan = plan_study(StudyConfig(name="k", trials=100, gpus_per_worker=0.25), pod)
    assert (plan.max_concurrent, plan.bound_by) == (4 * limits["nvidia.com/gpu"], "GPUs"), plan.describe()


# -- runtime environment --------------------------------------------------------------------------


def test_runtime_env_is_accepted_by_ray_and_merges_with_tuning_run() -> None:
    path = CLUSTER / "runtime_env.yaml"
    submitted = parse_runtime_env_args(runtime_env=str(path), working_dir=".")  # `ray job submit` does this
    unknown = set(submitted) - RuntimeEnv.known_fields  # Ray would look for a plugin of that name
    assert not unknown, f"runtime_env.yaml has fields Ray does not know: {sorted(unknown)}"
    job_env = RuntimeEnv(**submitted)  # raises on invalid values
    assert job_env["working_dir"] == "."
    # tuning.run's ray.init(runtime_env=...) inside the job must not clash with it (Ray raises then).
    driver_env = tuning.run._ray_address_env("10.0.0.5:6379")
    assert driver_env, "tuning.run no longer sets RAY_ADDRESS for its workers: revisit this test"
    assert _merge_runtime_env(job_env, driver_env) is not None, "runtime_env.yaml sets what tuning.run sets"
    leaked = [k for k in job_env.get("env_vars", {}) if CREDENTIAL.match(k)]
    assert not leaked, f"credentials do not belong in a runtime env (stored and shown by the cluster): {leaked}"


def test_runtime_env_excludes_data_history_and_secrets() -> None:
    excluded = _get_excludes(ROOT, _load("runtime_env.yaml")["excludes"])  # Ray's own matcher
    for path in (".heimdall/store/x.parquet", ".git/HEAD", "data/raw.bin", "cluster/.env", "mlruns/0/meta.yaml",
                 "model.onnx", "heimdall_tune.egg-info/PKG-INFO"):
        assert excluded(ROOT / path), f"{path} would be uploaded with --working-dir"
    for path in ("tuning/run.py", "tuning/data/cli.py", "heimdall/store/s3.py", "search_spaces/resnet.yaml", "pyproject.toml",
                 "constraints.txt", "cluster/runtime_env.yaml"):
        assert not excluded(ROOT / path), f"{path} is needed by the job but excluded"


# -- study command lines --------------------------------------------------------------------------


def _uncomment(line: str) -> str:
    return line.strip().lstrip("#").strip()


_COMMAND_IN_COMMENT = re.compile(r"^python -m tuning\.run\b|\s--\spython -m tuning\.run\b")


def _study_commands() -> list[tuple[str, str]]:
    """(where, text) of every ``python -m tuning.run`` command: RayJob entrypoints, and comment
    lines that start with one or pass one to ``ray job submit ... --`` (not prose naming it)."""
    found = []
    for _, doc in _k8s_docs():
        if doc.get("kind") == "RayJob":
            found.append(("cluster/kuberay/rayjob.yaml entrypoint", doc["spec"]["entrypoint"]))
    for path in SHIPPED:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "python -m tuning.run" not in line or not line.lstrip().startswith("#"):
                continue
            text, j = _uncomment(line), i
            while text.endswith("\\") and j + 1 < len(lines):
                j += 1
                text = text[:-1] + " " + _uncomment(lines[j])
            if _COMMAND_IN_COMMENT.search(text):
                found.append((f"{_rel(path)}:{i + 1}", text))
    return found


STUDY_COMMANDS = _study_commands()


def test_study_commands_are_found() -> None:
    wheres = [where for where, _ in STUDY_COMMANDS]
    assert "cluster/kuberay/rayjob.yaml entrypoint" in wheres
    assert any(w.startswith("cluster/runtime_env.yaml") for w in wheres)
    assert any(w.startswith("cluster/ray-cluster.yaml") for w in wheres)


def _tuning_args(text: str) -> list[str]:
    tokens = shlex.split(text[text.index("python -m tuning.run"):])[3:]
    for i, token in enumerate(tokens):
        if token in ("&&", "||", ";", "|") or token.startswith("#"):
            return tokens[:i]
    return tokens


@pytest.mark.parametrize(("where", "text"), STUDY_COMMANDS, ids=[w for w, _ in STUDY_COMMANDS])
def test_study_command_parses_and_names_shipped_things(where: str, text: str) -> None:
    argv = _tuning_args(text)
    try:
        args = tuning.run.build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage error (its message went to stderr)
        pytest.fail(f"{where}: `python -m tuning.run {shlex.join(argv)}` is a usage error (exit {exc.code})")
    if not args.resume:
        assert args.space in available_spaces(), f"{where}: --space {args.space!r} is not shipped"
        load_space(args.space)
    for flag in ("store", "storage_path", "models_store"):
        bucket = _bucket(getattr(args, flag) or "")
        assert bucket is None or bucket in _compose_buckets(), (
            f"{where}: --{flag.replace('_', '-')} uses bucket {bucket!r}, which minio-init does not create")


# -- environment variables ------------------------------------------------------------------------


def test_every_heimdall_variable_named_is_documented() -> None:
    documented = _documented_vars()
    assert {"HEIMDALL_STORE", "HEIMDALL_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "PGPASSWORD"} <= documented
    for path in SHIPPED:
        unknown = set(re.findall(r"\bHEIMDALL_[A-Z0-9_]+\b", path.read_text(encoding="utf-8"))) - documented
        assert not unknown, f"{_rel(path)} names variables tuning does not read: {sorted(unknown)}"


def _vars_given_to_tuning() -> list[tuple[str, str]]:
    """(where, name) of every variable set for processes that run tuning code."""
    given = [("env.example", k) for k in _env_example() if k not in _compose_refs()]
    compose = _load("docker-compose.yml")["services"]["ray-head"]["environment"]
    given += [("docker-compose.yml ray-head", k) for k in compose]
    runtime = (CLUSTER / "runtime_env.yaml").read_text(encoding="utf-8").split("env_vars:", 1)[1]
    given += [("runtime_env.yaml", k) for k in re.findall(r"^\s*#?\s*([A-Z][A-Z0-9_]+):", runtime, flags=re.M)]
    for name, doc in _k8s_docs():
        if doc.get("kind") in ("RayCluster", "RayJob"):
            given += [(name, e["name"]) for c in _containers(doc) for e in c.get("env", [])]
    given += [("secrets.example.yaml heimdall-credentials", k) for k in _secrets()["heimdall-credentials"]]
    return given


def test_every_variable_given_to_tuning_is_read_by_it_or_ray() -> None:
    known = _documented_vars() | RAY_VARS | OTHER_VARS
    given = _vars_given_to_tuning()
    assert len(given) > 20
    unknown = sorted({f"{where}: {name}" for where, name in given if name not in known})
    assert not unknown, f"variables that nothing reads (typo?): {unknown}"


def test_env_example_lists_every_compose_variable() -> None:
    listed = set(_env_example())
    missing = _compose_refs() - listed
    assert not missing, f"docker-compose.yml uses variables env.example does not list: {sorted(missing)}"


def test_env_example_leaves_credentials_empty() -> None:
    credentials = {k: v for k, v in _env_example().items() if CREDENTIAL.match(k)}
    assert {"AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "RAY_AUTH_TOKEN"} <= set(credentials)
    assert set(credentials) <= set(_env_example_set()), "credentials must be listed, not commented out"
    filled = [k for k, v in credentials.items() if v.strip()]
    assert not filled, f"env.example must not hold credential values: {filled}"


# -- no literal credentials -----------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"(?<![\w$])([A-Za-z0-9_]+)\s*[:=][ \t]*(\"[^\"]*\"|'[^']*'|\S*)")
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]+)@")
# AWS key ids; long hex or base64 runs with digits and lower-case letters (Ray tokens, S3 secrets),
# which upper-case variable names are not.
_SECRET_LOOKING = re.compile(r"AKIA[0-9A-Z]{16}|(?<![\w/+-])(?=[\w/+-]*\d)(?=[\w/+-]*[a-z])[\w/+-]{32,}=*(?![\w/+=-])")


def _allowed_value(value: str) -> bool:
    """A reference, placeholder or path rather than a credential."""
    v = value.strip("\"'")
    return (v == "" or v.startswith(("${", "$$", "$")) or re.fullmatch(r"<[^<>]+>", v) is not None
            or v.startswith(("~/", "/")))


def _code(line: str) -> str:
    """The line without its comment (lines here never put '#' inside a value)."""
    return "" if line.lstrip().startswith("#") else re.split(r"\s+#", line, maxsplit=1)[0]


@pytest.mark.parametrize("path", SHIPPED, ids=_rel)
def test_no_literal_credentials(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for key, value in _ASSIGNMENT.findall(_code(line)):
            if CREDENTIAL.match(key) and not _allowed_value(value):
                problems.append(f"line {n}: {key} has a literal value")
        for password in _URL_PASSWORD.findall(line):
            if not password.startswith("${"):
                problems.append(f"line {n}: a URL with a password (use PGPASSWORD or a secret)")
        if _SECRET_LOOKING.search(line):
            problems.append(f"line {n}: looks like a key or token")
    assert not problems, f"{_rel(path)}: " + "; ".join(problems)


def test_credential_check_catches_literals() -> None:
    """The check above fails on what it must (else it asserts nothing)."""
    assert not _allowed_value("hunter2") and not _allowed_value('"s3cr3t"')
    assert _allowed_value("${PGPASSWORD:?set PGPASSWORD in cluster/.env}") and _allowed_value('"<S3 secret key>"')
    assert [k for k, v in _ASSIGNMENT.findall("      MINIO_ROOT_PASSWORD: hunter22")
            if CREDENTIAL.match(k) and not _allowed_value(v)] == ["MINIO_ROOT_PASSWORD"]
    assert _URL_PASSWORD.findall("postgresql://postgres:hunter2@db:5432/heimdall") == ["hunter2"]
    assert _SECRET_LOOKING.search("token 3f9a1c0e5b7d4a2e8c6f1b3d5e7a9c0b")
    assert _SECRET_LOOKING.search("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not _SECRET_LOOKING.search("condition: service_completed_successfully")
    assert not _SECRET_LOOKING.search("(RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)")


def test_compose_requires_every_credential() -> None:
    for name, service in _load("docker-compose.yml")["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if CREDENTIAL.match(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?set [A-Z0-9_]+ in cluster/\.env\}", str(value)), (
                    f"{name}: {key} must be ${{VAR:?set VAR in cluster/.env}}, got {value!r}")


def test_kubernetes_reads_credentials_only_from_secrets() -> None:
    secrets = _secrets()
    for value in (v for data in secrets.values() for v in data.values()):
        assert re.fullmatch(r"<[^<>]+>", value), f"secrets.example.yaml must hold placeholders, got {value!r}"
    containers = [(name, c) for name, doc in _k8s_docs() if doc.get("kind") != "Secret" for c in _containers(doc)]
    assert len(containers) >= 3  # head, worker, job submitter
    for name, container in containers:
        for entry in container.get("env", []):
            if CREDENTIAL.match(entry["name"]):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                assert "value" not in entry and ref, f"{name}: {entry['name']} must come from a secretKeyRef"
                assert ref["key"] in secrets.get(ref["name"], {}), f"{name}: no Secret {ref['name']}/{ref['key']}"
        for source in container.get("envFrom", []):
            assert set(source) == {"secretRef"} and source["secretRef"]["name"] in secrets, (
                f"{name}: envFrom must name a Secret of secrets.example.yaml, got {source}")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"} <= set(secrets["heimdall-credentials"])


# -- docker compose against the code --------------------------------------------------------------


def test_compose_creates_the_buckets_everyone_uses() -> None:
    buckets = _compose_buckets()
    mlflow = _load("docker-compose.yml")["services"]["mlflow"]["command"]
    used = {MODELS_BUCKET, DATASETS_BUCKET, _bucket(mlflow[mlflow.index("--artifacts-destination") + 1])}
    used |= {_bucket(_env_example()[k]) for k in ("HEIMDALL_STORE", "HEIMDALL_STORAGE_PATH")}
    assert None not in used and used <= buckets, f"minio-init must create {sorted(used - buckets)}"
    # Upstream Heimdall's lifecycle job deletes unreferenced objects in its raw-IQ bucket.
    assert RAW_IQ_BUCKET not in buckets and _bucket(_env_example()["HEIMDALL_STORE"]) == DATASETS_BUCKET
    texts = [(CLUSTER / n).read_text(encoding="utf-8") for n in ("docker-compose.yml", "env.example",
                                                                  "runtime_env.yaml", "kuberay/rayjob.yaml")]
    assert not [t for t in texts if f"--store s3://{RAW_IQ_BUCKET}" in t or f"STORE: s3://{RAW_IQ_BUCKET}" in t]
    settings = S3Settings(endpoint="http://127.0.0.1:9", access_key="placeholder", secret_key="placeholder")
    for bucket in buckets:
        S3Store(settings, bucket)  # raises ConfigError on a name S3 would refuse; does no I/O


def test_compose_creates_the_databases_everyone_uses() -> None:
    created = set(re.findall(r"CREATE DATABASE (\w+)", (CLUSTER / "postgres-init.sql").read_text(encoding="utf-8")))
    texts = [(CLUSTER / n).read_text(encoding="utf-8") for n in ("docker-compose.yml", "env.example")]
    used = {db for t in texts for db in re.findall(r"postgresql(?:\+psycopg2)?://[^/\s]+/(\w+)", t)}
    assert {"heimdall", "mlflow"} <= used <= created, f"postgres-init.sql must create {sorted(used - created)}"


def test_compose_paths_exist() -> None:
    for name, service in _load("docker-compose.yml")["services"].items():
        build = service.get("build")
        if build:
            assert (CLUSTER / build["context"] / build["dockerfile"]).is_file(), f"{name}: no Dockerfile"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (CLUSTER / source).exists(), f"{name}: bind-mount source {source} is missing"


def test_dockerfile_copies_what_the_package_needs() -> None:
    text = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    assert re.search(r"^FROM python:3\.11", text, flags=re.M) and "3.11" in requires
    copied = {src for line in re.findall(r"^COPY (.+)$", text, flags=re.M) for src in line.split()[:-1]}
    assert {"pyproject.toml", "constraints.txt", "heimdall", "tuning", "search_spaces"} <= copied
    assert all((ROOT / src).exists() for src in copied), f"COPY sources missing: {copied}"
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert "cluster/.env" in ignored
