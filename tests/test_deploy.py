"""Offline checks of deploy/: manifests, run configuration, commands, image, README.

No cluster, no docker: the Kubernetes objects are validated against the OpenAPI schemas that
``kubernetes-validate`` ships, the DaskJob against the CRD in the ``dask-kubernetes`` wheel,
the gateway's pods are built from the Helm values with ``dask-gateway-server``'s own code, and
every command the manifests and deploy/README.md run is parsed by popdask's (and distributed's)
own argument parsers.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from popdask.cli import build_parser
from popdask.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"
DOCKERFILE = DEPLOY / "Dockerfile"
GATEWAY_VALUES = DEPLOY / "helm" / "dask-gateway-values.yaml"

#: Versions the image pins and the tests validate against (report them in the test extra).
DASK_KUBERNETES_VERSION = "2026.3.0"
DASK_GATEWAY_VERSION = "2026.3.0"
#: The oldest Kubernetes the manifests target (CronJob.timeZone is GA in 1.27) and the newest
#: whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.37")

NAMESPACE = "popdask"
IMAGE = "registry.example.org/popdask/popdask:0.1.0"
UID = 1000
DASKJOB = "popdask-rebuild"
#: What the dask-kubernetes operator injects into the DaskJob's containers.
OPERATOR_ENV = {
    "DASK_SCHEDULER_ADDRESS": f"tcp://{DASKJOB}-scheduler.{NAMESPACE}.svc.cluster.local:8786",
    "DASK_WORKER_NAME": f"{DASKJOB}-default-worker-0a1b2c3d4e",
}
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|SUBSCRIPTION_KEY|CREDENTIAL", re.I)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [
        d for _, d in _objects() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def _daskjob() -> dict:
    return _one("DaskJob", DASKJOB)


def _run_config() -> dict:
    return yaml.safe_load(_one("ConfigMap", "popdask-run")["data"]["run.yaml"])


def _container(pod_spec: dict, name: str) -> dict:
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {[c['name'] for c in pod_spec['containers']]}")


def _pod_specs() -> list[tuple[str, dict]]:
    """Every pod template in deploy/k8s: (where, PodSpec)."""
    job = _daskjob()["spec"]
    cron = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return [
        ("DaskJob runner", job["job"]["spec"]),
        ("DaskJob scheduler", job["cluster"]["spec"]["scheduler"]["spec"]),
        ("DaskJob worker", job["cluster"]["spec"]["worker"]["spec"]),
        ("CronJob", cron),
    ]


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args with ``env``."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in args]


def _k8s_validate(obj: dict, version: str, what: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        pytest.fail(f"{what}: Kubernetes {version} schema: {e.message} at {where or '(top)'}")


def _parse_popdask(argv: list[str]):
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`popdask {shlex.join(argv)}` is not a valid popdask command (exit {e.code})")


# --------------------------------------------------------------------------------------
# Manifests: parse, schemas
# --------------------------------------------------------------------------------------
def test_manifests_parse_and_hold_the_expected_objects():
    for path in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]:
        assert _docs(path), f"{path}: empty YAML"
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in _objects()}
    assert kinds == {
        ("ConfigMap", "popdask-run"),
        ("DaskJob", DASKJOB),
        ("ServiceAccount", "popdask-rebuild-submitter"),
        ("Role", "popdask-rebuild-submitter"),
        ("RoleBinding", "popdask-rebuild-submitter"),
        ("CronJob", "popdask-rebuild-monthly"),
    }
    for file, d in _objects():
        assert d["metadata"].get("namespace") == NAMESPACE, f"{file}: {d['kind']} namespace"
        assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "popdask", file
    # daskjob.yaml is also loaded into a ConfigMap as the CronJob's template: one object only
    assert len(_docs(K8S / "daskjob.yaml")) == 1


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(version):
    validated = []
    for file, d in _objects():
        if d["apiVersion"].startswith("kubernetes.dask.org/"):
            continue
        _k8s_validate(d, version, f"{file}: {d['kind']} {d['metadata']['name']}")
        validated.append(d["kind"])
    assert sorted(validated) == sorted(
        ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob"]
    )


def test_kubernetes_validation_is_strict():
    """The check above would catch a misspelt key (so it is not vacuous)."""
    import kubernetes_validate

    cron = copy.deepcopy(_one("CronJob"))
    cron["spec"]["concurencyPolicy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_daskjob_pod_templates_validate_as_kubernetes_pods(version):
    """The CRD carries a Kubernetes 1.21 PodSpec; check the pods against current ones too."""
    for where, spec in _pod_specs():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
        _k8s_validate(pod, version, where)
    service = _daskjob()["spec"]["cluster"]["spec"]["scheduler"]["service"]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": service}
    _k8s_validate(svc, version, "DaskJob scheduler Service")
    meta = _daskjob()["metadata"]
    _k8s_validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}, version, "DaskJob metadata"
    )


@functools.cache
def _crd_schema(plural: str) -> tuple[dict, dict]:
    """(CRD, strict JSON schema) of a dask-kubernetes custom resource, from its wheel."""
    path = (
        files("dask_kubernetes")
        / "operator/deployment/helm/dask-kubernetes-operator/crds"
        / f"{plural[:-1]}.yaml"
    )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(s: dict) -> None:
        # The API server prunes unknown fields and, with kubectl's default field validation
        # (Strict), refuses them: reject them here too.
        for sub in (s.get("properties") or {}).values():
            strict(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(s.get(key), dict):
                strict(s[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key, []):
                strict(sub)
        if s.get("nullable") and isinstance(s.get("type"), str):
            s["type"] = [s["type"], "null"]
        if (
            "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False

    strict(schema)
    schema["properties"].update(
        apiVersion={"const": f"{crd['spec']['group']}/v1"},
        kind={"const": crd["spec"]["names"]["kind"]},
        metadata={"type": "object"},
    )
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return crd, schema


def _crd_errors(obj: dict) -> list[str]:
    import jsonschema

    _, schema = _crd_schema("daskjobs")
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def test_daskjob_validates_against_the_dask_kubernetes_crd():
    import dask_kubernetes

    assert dask_kubernetes.__version__ == DASK_KUBERNETES_VERSION
    errors = _crd_errors(_daskjob())
    assert not errors, "DaskJob does not match the CRD:\n" + "\n".join(errors)
    # the same check refuses a misspelt key and a number where the CRD wants a quantity string
    bad = copy.deepcopy(_daskjob())
    bad["spec"]["cluster"]["spec"]["worker"]["replica"] = 3
    bad["spec"]["job"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 2
    errors = _crd_errors(bad)
    assert any("'replica' was unexpected" in e for e in errors), errors
    assert any("limits/cpu" in e for e in errors), errors


# --------------------------------------------------------------------------------------
# The DaskJob: commands, configuration, wiring, security
# --------------------------------------------------------------------------------------
def test_daskjob_runner_command_and_run_configuration_are_valid():
    job = _daskjob()
    spec = job["spec"]["job"]["spec"]
    runner = _container(spec, "runner")
    assert "command" not in runner, "the image's entrypoint (dumb-init) must run the args"
    assert "$(DASK_SCHEDULER_ADDRESS)" in " ".join(runner["args"])
    argv = _expand(runner["args"], OPERATOR_ENV)
    assert argv[0] == "popdask"
    args = _parse_popdask(argv[1:])
    assert args.command == "run"

    # the configuration file is the ConfigMap's run.yaml, mounted where the args say
    mounts = {m["mountPath"]: m["name"] for m in runner["volumeMounts"]}
    config_dir, config_file = args.config.rsplit("/", 1)
    (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[config_dir]]
    assert volume["configMap"]["name"] == "popdask-run"
    assert {"key": "run.yaml", "path": config_file} in volume["configMap"]["items"]

    cfg = config_from_dict(_run_config(), overrides=args.set)
    assert cfg.cluster.kind == "address"
    assert cfg.cluster.address == OPERATOR_ENV["DASK_SCHEDULER_ADDRESS"]
    assert cfg.stac.sign == "planetary_computer"
    assert cfg.stac.url == "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert cfg.sources.sentinel2.collection == "sentinel-2-l2a"
    assert cfg.sources.sentinel2.mask_asset == "SCL"
    assert cfg.sources.sentinel1 is not None
    assert cfg.sources.sentinel1.collection == "sentinel-1-rtc"
    assert cfg.sources.sentinel1.assets == ["vv", "vh"]
    assert cfg.output.path.startswith("s3://") and cfg.output.path.endswith(".zarr")
    assert cfg.output.storage_options, "storage_options for the S3 store"
    assert 1 < len(cfg.make_grid().tiles()) < 5000
    # the report folder is a mounted volume (the root filesystem is read-only)
    assert args.report_dir in mounts
    # the census is a local file written by the init container into a shared volume
    census_dir = cfg.census.path.rsplit("/", 1)[0]
    assert mounts[census_dir] == "census"


def test_census_fetch_init_container_copies_the_file(tmp_path):
    spec = _daskjob()["spec"]["job"]["spec"]
    fetch = _container(spec, "fetch-census")
    python, flag, code, src, dest = fetch["args"]
    assert (python, flag, src) == ("python", "-c", "$(CENSUS_URL)")
    assert dest == _run_config()["census"]["path"]
    (env,) = [e for e in fetch["env"] if e["name"] == "CENSUS_URL"]
    ref = env["valueFrom"]["configMapKeyRef"]
    assert ref["name"] == "popdask-run"
    url = _one("ConfigMap", "popdask-run")["data"][ref["key"]]
    assert url.startswith("s3://") and url.endswith(".gpkg")
    assert {m["mountPath"] for m in fetch["volumeMounts"]} >= {dest.rsplit("/", 1)[0]}
    # run the init container's code for real, on a local file:// URL
    source = tmp_path / "grid.gpkg"
    source.write_bytes(b"SQLite format 3\x00" + bytes(range(256)))
    target = tmp_path / "out" / "census.gpkg"
    target.parent.mkdir()
    subprocess.run([sys.executable, "-c", code, source.as_uri(), str(target)], check=True)
    assert target.read_bytes() == source.read_bytes()


def test_daskjob_scheduler_and_worker_commands_are_valid_for_distributed():
    from distributed.cli.dask_scheduler import main as scheduler_main
    from distributed.cli.dask_worker import main as worker_main

    commands = {ep.name for ep in importlib.metadata.entry_points(group="dask_cli")}
    assert {"scheduler", "worker"} <= commands, "`dask scheduler` / `dask worker` must exist"

    cluster = _daskjob()["spec"]["cluster"]["spec"]
    scheduler = _container(cluster["scheduler"]["spec"], "scheduler")
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    scheduler_main.make_context("dask scheduler", _expand(scheduler["args"][2:], OPERATOR_ENV))
    ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert cluster["idleTimeout"] > 0

    worker = _container(cluster["worker"]["spec"], "worker")
    assert worker["args"][:2] == ["dask", "worker"]
    ctx = worker_main.make_context("dask worker", _expand(worker["args"][2:], OPERATOR_ENV))
    assert ctx.params["name"] == OPERATOR_ENV["DASK_WORKER_NAME"]
    assert ctx.params["scheduler"] is None  # taken from DASK_SCHEDULER_ADDRESS
    # threads = CPUs; dask's memory limit below the container's (the OOM killer's)
    from dask.utils import parse_bytes

    limits = worker["resources"]["limits"]
    assert ctx.params["nthreads"] == int(limits["cpu"])
    assert worker["resources"]["requests"] == limits  # Guaranteed QoS
    container_bytes = parse_bytes(limits["memory"].replace("i", "iB"))
    assert parse_bytes(ctx.params["memory_limit"]) < container_bytes
    assert cluster["worker"]["replicas"] >= 1
    # a misspelt worker flag would be refused by the same parser
    with pytest.raises(Exception, match="unexpected extra argument"):
        worker_main.make_context("dask worker", ["--nthread", "2"])


def test_daskjob_wiring():
    job = _daskjob()
    name = job["metadata"]["name"]
    cluster = job["spec"]["cluster"]["spec"]
    service = cluster["scheduler"]["service"]
    # the operator names the cluster after the DaskJob; its Service must select that cluster
    assert service["selector"] == {
        "dask.org/cluster-name": name,
        "dask.org/component": "scheduler",
    }
    scheduler = _container(cluster["scheduler"]["spec"], "scheduler")
    port_names = {p["name"] for p in scheduler["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    assert {p["port"] for p in service["ports"]} == {8786, 8787}
    assert OPERATOR_ENV["DASK_SCHEDULER_ADDRESS"].startswith(f"tcp://{name}-scheduler.")
    # a failed run must end the DaskJob (and free the workers), not restart forever
    assert job["spec"]["job"]["spec"]["restartPolicy"] == "Never"


def test_pods_are_non_root_use_one_image_and_get_credentials_from_the_secret():
    for where, spec in _pod_specs():
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID != 0, where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        volumes = {v["name"] for v in spec.get("volumes", [])}
        env_names = set(OPERATOR_ENV) if where.startswith("DaskJob") else set()
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            what = f"{where}/{c['name']}"
            assert c["image"] == IMAGE, what
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, what
            assert csc["capabilities"]["drop"] == ["ALL"], what
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            assert set(mounts) <= volumes, f"{what}: mounts a volume the pod lacks"
            if csc.get("readOnlyRootFilesystem"):
                assert "/tmp" in mounts.values(), f"{what}: read-only root needs a /tmp"
            # every $(VAR) in the args resolves, so Kubernetes leaves none unexpanded
            names = env_names | {e["name"] for e in c.get("env", [])}
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert var in names, f"{what}: $({var}) is not defined"
            # no credential in a manifest: only from the Secret
            for e in c.get("env", []):
                if SECRET_WORDS.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{what}: {e['name']}"
    job = _daskjob()["spec"]
    needs_s3 = [
        _container(job["job"]["spec"], "fetch-census"),
        _container(job["job"]["spec"], "runner"),
        _container(job["cluster"]["spec"]["worker"]["spec"], "worker"),
    ]
    for c in needs_s3:
        assert {"secretRef": {"name": "popdask-credentials"}} in c["envFrom"], c["name"]
    data = _one("ConfigMap", "popdask-run")["data"]
    assert not any(SECRET_WORDS.search(k) for k in data)
    assert not SECRET_WORDS.search(json.dumps(_run_config()["output"]["storage_options"]))


# --------------------------------------------------------------------------------------
# The CronJob and its RBAC
# --------------------------------------------------------------------------------------
def _cron_container() -> dict:
    spec = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return _container(spec, "submit")


def _cron_script() -> dict:
    c = _cron_container()
    assert c["command"] == ["python", "-c"]
    (code,) = c["args"]
    assert "$(" not in code, "Kubernetes would expand $(...) in the script"
    namespace = {"__name__": "popdask_cron_under_test"}
    exec(compile(code, "cronjob.yaml:submit", "exec"), namespace)
    return namespace


def test_cronjob_schedule_policy_and_rbac():
    cron = _one("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert spec["jobTemplate"]["spec"]["backoffLimit"] >= 0
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    sa = _one("ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    role = _one("Role")
    binding = _one("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # least privilege: exactly what the script calls, on DaskJobs only
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["kubernetes.dask.org"] and rule["resources"] == ["daskjobs"]
    code = _cron_container()["args"][0]
    used = set(re.findall(r"api\.(\w+)_namespaced_custom_object", code))
    assert set(rule["verbs"]) == used == {"get", "create", "delete"}


def test_cronjob_script_uses_only_what_the_image_has():
    tree = ast.parse(_cron_container()["args"][0])
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules - set(sys.stdlib_module_names) == {"yaml", "kubernetes"}
    # yaml comes with popdask; the kubernetes client with dask-kubernetes (in the image)
    requires = importlib.metadata.requires("dask-kubernetes")
    assert any(re.match(r"kubernetes\b(?!-)", r) for r in requires)


def test_cronjob_template_and_output_of_the_month():
    c = _cron_container()
    env = {e["name"]: e["value"] for e in c["env"]}
    pod = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    template_dir, template_file = env["DASKJOB_TEMPLATE"].rsplit("/", 1)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[template_dir]]
    # the ConfigMap the README tells to create from daskjob.yaml, under that key
    readme = README.read_text()
    cm = volume["configMap"]["name"]
    assert f"create configmap {cm}" in readme
    assert f"--from-file={template_file}=deploy/k8s/daskjob.yaml" in readme

    script = _cron_script()
    path = script["output_path"](env["OUTPUT_PATH_TEMPLATE"], datetime(2026, 12, 1, tzinfo=UTC))
    assert path.startswith("s3://") and path.endswith("/2026-12.zarr")
    template = yaml.safe_load((K8S / "daskjob.yaml").read_text())
    before = copy.deepcopy(template)
    job = script["with_output"](template, path)
    assert template == before, "the template must not be changed in place"
    errors = _crd_errors(job)
    assert not errors, errors
    runner = _container(job["spec"]["job"]["spec"], "runner")
    args = _parse_popdask(_expand(runner["args"], OPERATOR_ENV)[1:])
    cfg = config_from_dict(_run_config(), overrides=args.set)
    assert cfg.output.path == path
    assert cfg.output.storage_options == _run_config()["output"]["storage_options"]


class _FakeDaskJobs:
    """Stands in for kubernetes.client.CustomObjectsApi: one DaskJob, or none."""

    def __init__(self, existing: dict | None):
        self.existing = existing
        self.calls: list[tuple] = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("get", group, version, namespace, plural, name))
        if self.existing is None:
            raise ApiException(status=404, reason="Not Found")
        return self.existing

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self.calls.append(("delete", namespace, name, kw.get("propagation_policy")))
        self.existing = None

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body))


@pytest.mark.parametrize("previous", [None, "Running", "Successful", "Failed"])
def test_cronjob_script_starts_skips_or_replaces_the_daskjob(previous, tmp_path, monkeypatch):
    import kubernetes

    env = {e["name"]: e["value"] for e in _cron_container()["env"]}
    (tmp_path / "daskjob.yaml").write_text((K8S / "daskjob.yaml").read_text())
    (tmp_path / "namespace").write_text(NAMESPACE + "\n")
    monkeypatch.setenv("DASKJOB_TEMPLATE", str(tmp_path / "daskjob.yaml"))
    monkeypatch.setenv("OUTPUT_PATH_TEMPLATE", env["OUTPUT_PATH_TEMPLATE"])
    existing = None if previous is None else {**_daskjob(), "status": {"jobStatus": previous}}
    api = _FakeDaskJobs(existing)
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda: api)
    script = _cron_script()
    script["NAMESPACE_FILE"] = str(tmp_path / "namespace")

    assert script["main"]() == 0
    verbs = [c[0] for c in api.calls]
    if previous == "Running":
        assert verbs == ["get"], "a running rebuild must not be replaced"
        return
    if previous is None:
        assert verbs == ["get", "create"]
    else:
        assert verbs == ["get", "delete", "get", "create"]
        assert api.calls[1] == ("delete", NAMESPACE, DASKJOB, "Foreground")
    _, group, version, namespace, plural, body = api.calls[-1]
    assert (group, version, namespace, plural) == (
        "kubernetes.dask.org",
        "v1",
        NAMESPACE,
        "daskjobs",
    )
    month = datetime.now(UTC).strftime("%Y-%m")
    runner = _container(body["spec"]["job"]["spec"], "runner")
    assert runner["args"][-2:] == [
        "--set",
        "output.path=" + env["OUTPUT_PATH_TEMPLATE"].format(month=month),
    ]


# --------------------------------------------------------------------------------------
# Dask Gateway Helm values
# --------------------------------------------------------------------------------------
#: The keys of the dask-gateway chart's values schema these values may use ("*": free-form).
_CHART_KEYS = {
    "gateway": {
        "loglevel": None,
        "auth": {
            "type": None,
            "jupyterhub": {
                "apiToken": None,
                "apiTokenFromSecretName": None,
                "apiTokenFromSecretKey": None,
                "apiUrl": None,
            },
        },
        "backend": {
            "image": {"name": None, "tag": None, "pullPolicy": None},
            "namespace": None,
            "environment": "*",
            "scheduler": {
                "cores": {"request": None, "limit": None},
                "memory": {"request": None, "limit": None},
                "extraPodConfig": "*",
                "extraContainerConfig": "*",
            },
            "worker": {
                "cores": {"request": None, "limit": None},
                "memory": {"request": None, "limit": None},
                "threads": None,
                "extraPodConfig": "*",
                "extraContainerConfig": "*",
            },
        },
        "extraConfig": "*",
    },
}


def _unknown_keys(values: dict, allowed: dict, path: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        where = f"{path}.{key}".lstrip(".")
        if key not in allowed:
            out.append(where)
        elif isinstance(allowed[key], dict):
            assert isinstance(value, dict), where
            out += _unknown_keys(value, allowed[key], where)
    return out


def _gateway_config():
    """The traitlets config the chart's dask_gateway_config.py builds from the values."""
    from traitlets.config import Config

    values = yaml.safe_load(GATEWAY_VALUES.read_text())

    def get_property(key, default=None):
        value = values
        for k in key.split("."):
            if not isinstance(value, dict) or k not in value:
                return default
            value = value[k]
        return value

    c = Config()
    backend = values["gateway"]["backend"]
    c.KubeClusterConfig.image = f"{backend['image']['name']}:{backend['image']['tag']}"
    for field, prop in [
        ("scheduler_cores", "scheduler.cores.request"),
        ("scheduler_cores_limit", "scheduler.cores.limit"),
        ("scheduler_memory", "scheduler.memory.request"),
        ("scheduler_memory_limit", "scheduler.memory.limit"),
        ("scheduler_extra_container_config", "scheduler.extraContainerConfig"),
        ("scheduler_extra_pod_config", "scheduler.extraPodConfig"),
        ("worker_cores", "worker.cores.request"),
        ("worker_cores_limit", "worker.cores.limit"),
        ("worker_memory", "worker.memory.request"),
        ("worker_memory_limit", "worker.memory.limit"),
        ("worker_extra_container_config", "worker.extraContainerConfig"),
        ("worker_extra_pod_config", "worker.extraPodConfig"),
        ("image_pull_policy", "image.pullPolicy"),
    ]:
        value = get_property("gateway.backend." + prop)
        if value is not None:
            setattr(c.KubeClusterConfig, field, value)
    c.KubeController.gateway_instance = "dask-gateway"
    c.KubeController.api_url = "http://api-dask-gateway.dask-gateway:8000/api"
    extra = values["gateway"]["extraConfig"]
    for key in sorted(extra):  # the chart appends the blocks in key order
        code = compile(extra[key], f"gateway.extraConfig.{key}", "exec")
        exec(code, {"c": c, "get_property": get_property})
    return values, c


def test_gateway_values_use_only_chart_keys():
    values = yaml.safe_load(GATEWAY_VALUES.read_text())
    assert not _unknown_keys(values, _CHART_KEYS)
    assert values["gateway"]["auth"]["type"] == "jupyterhub"
    assert "apiToken" not in values["gateway"]["auth"]["jupyterhub"], "no token in the values"
    assert f"{values['gateway']['backend']['image']['name']}:" in IMAGE
    assert IMAGE.endswith(":" + values["gateway"]["backend"]["image"]["tag"])
    assert _unknown_keys({"gateway": {"backend": {"imagee": {}}}}, _CHART_KEYS)


def test_gateway_values_build_valid_popdask_pods():
    from dask_gateway_server.backends.kubernetes.backend import KubeClusterConfig
    from dask_gateway_server.backends.kubernetes.controller import KubeController
    from distributed.cli.dask_worker import main as worker_main

    _, c = _gateway_config()
    kc = c.KubeClusterConfig
    assert kc.scheduler_cmd == ["dask", "scheduler"] and kc.worker_cmd == ["dask", "worker"]
    assert 0 < kc.idle_timeout <= 3600, "forgotten clusters must shut down"
    options = c.Backend.cluster_options

    defaults = options.parse_options({})
    assert defaults["image"] == IMAGE
    with pytest.raises(ValueError):
        options.parse_options({"worker_cores": 1000})
    with pytest.raises(ValueError):
        options.parse_options({"worker_memory": 10_000})

    controller = KubeController(config=c)
    for request in [{}, *(_readme_gateway_options())]:
        parsed = options.parse_options(request)
        overrides = options.get_configuration(parsed, None)
        cfg = KubeClusterConfig(config=c, **overrides)
        assert cfg.worker_threads == cfg.worker_cores == parsed["worker_cores"]
        assert cfg.worker_memory == cfg.worker_memory_limit == parsed["worker_memory"] * 2**30
        assert cfg.image == IMAGE
        for is_worker in (False, True):
            pod = controller.make_pod("dask-gateway", "0123abcd", cfg, is_worker=is_worker)
            what = "gateway worker" if is_worker else "gateway scheduler"
            for version in K8S_VERSIONS:
                _k8s_validate(pod, version, what)
            spec = pod["spec"]
            assert spec["securityContext"]["runAsUser"] == UID
            (container,) = spec["containers"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
            if is_worker:
                assert container["args"][:2] == ["dask", "worker"]
                env = {"DASK_GATEWAY_WORKER_NAME": "dask-worker-0123abcd-xyz"}
                worker_main.make_context("dask worker", _expand(container["args"][2:], env))
                assert {"secretRef": {"name": "popdask-credentials"}} in container["envFrom"]
            else:
                assert container["args"][:2] == ["dask", "scheduler"]


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _extra_packages() -> dict[str, str]:
    (arg,) = [rest for word, rest in _instructions() if word == "ARG" and "EXTRA_PACKAGES" in rest]
    pins = shlex.split(arg.split("=", 1)[1])[0].split()
    out = {}
    for pin in pins:
        name, sep, version = pin.partition("==")
        assert sep and version, f"Dockerfile: {pin!r} is not pinned with =="
        out[name.lower()] = version
    return out


def test_dockerfile():
    ins = _instructions()
    words = [w for w, _ in ins]
    (base,) = [rest for w, rest in ins if w == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base), base
    assert "latest" not in base

    runs = [rest for w, rest in ins if w == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs and all("-c constraints.txt" in r for r in installs)
    assert any(re.search(r"pip install -c constraints\.txt \.(\s|$)", r) for r in installs)
    assert any("dask worker --help" in r for r in runs), "the image must be a worker image"
    assert (ROOT / "constraints.txt").is_file()

    pins = _extra_packages()
    assert pins["dask-gateway"] == DASK_GATEWAY_VERSION
    assert pins["dask-kubernetes"] == DASK_KUBERNETES_VERSION
    assert importlib.metadata.version("dask-kubernetes") == DASK_KUBERNETES_VERSION
    constraints = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name, version in pins.items():
        assert constraints.get(name, version) == version, f"{name} pinned twice, differently"

    # non-root, numeric (runAsNonRoot can only verify a number), after every install
    user_at = max(i for i, w in enumerate(words) if w == "USER")
    assert user_at > max(i for i, w in enumerate(words) if w == "RUN")
    uid, _, gid = ins[user_at][1].partition(":")
    assert uid.isdigit() and int(uid) == UID != 0 and (not gid or int(gid) != 0)
    assert "WORKDIR" in words[user_at:]

    # no credentials baked in
    for w, rest in ins:
        if w in ("ENV", "ARG"):
            assert not SECRET_WORDS.search(rest), f"{w} {rest}"

    # the entrypoint runs any command (operator and gateway pass `dask worker ...` as args)
    (entry,) = [json.loads(rest) for w, rest in ins if w == "ENTRYPOINT"]
    assert entry[0] == "dumb-init" and "dumb-init" in pins and "popdask" not in entry
    (cmd,) = [json.loads(rest) for w, rest in ins if w == "CMD"]
    assert cmd[0] == "popdask"


def test_dockerfile_gives_workers_popdasks_allocator_settings(tmp_path):
    """The image's dask configuration carries popdask.cluster.WORKER_MALLOC into the
    nanny's pre-spawn environment and turns the workers' profiler off: the RUN's own
    commands, run here against a temporary config folder in place of /etc/dask."""
    import os

    (run,) = [r for w, r in _instructions() if w == "RUN" and "/etc/dask/popdask.yaml" in r]
    steps = [c.strip() for c in run.split("&&") if c.strip().startswith("python -c")]
    assert len(steps) == 2  # write the file, then check what dask reads from it
    env = {**os.environ, "DASK_CONFIG": str(tmp_path)}
    for step in steps:
        code = shlex.split(step)[2].replace("/etc/dask", str(tmp_path))
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    from popdask.cluster import WORKER_MALLOC

    written = yaml.safe_load((tmp_path / "popdask.yaml").read_text())
    assert written == {
        "distributed": {
            "nanny": {"pre-spawn-environ": WORKER_MALLOC},
            "worker": {"profile": {"enabled": False}},
        }
    }


def test_dockerfile_build_context_is_the_repository_root():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything else stays out of the context"
    for w, rest in _instructions():
        if w != "COPY":
            continue
        *sources, _ = shlex.split(rest)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository root"
            assert f"!{src}" in patterns or f"!{src}/" in patterns, f"{src} is .dockerignored"
    assert "docker build -f deploy/Dockerfile" in README.read_text()


# --------------------------------------------------------------------------------------
# deploy/README.md
# --------------------------------------------------------------------------------------
_IMAGE_REFS = {"$IMAGE", "${IMAGE}"}


def _readme_commands() -> list[list[str]]:
    """Every `popdask ...` command in the README's code blocks, as argv after `popdask`."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", README.read_text(), re.S)
    out = []
    for block in blocks:
        for line in re.sub(r"\\\n", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            for i, tok in enumerate(tokens):
                if tok == "popdask" and (i == 0 or tokens[i - 1] in {"--", *_IMAGE_REFS}):
                    argv = []
                    for t in tokens[i + 1 :]:
                        if t in {"|", "||", "&&", ";", ">", ">>"}:
                            break
                        argv.append(t)
                    out.append(_expand(argv, OPERATOR_ENV))
    return out


def _readme_gateway_options() -> list[dict]:
    out = []
    for argv in _readme_commands():
        if "--version" in argv or "--help" in argv:
            continue
        args = build_parser().parse_args(argv)
        if args.command == "run":
            cfg = config_from_dict(_run_config(), overrides=args.set)
            if cfg.cluster.kind == "gateway":
                out.append(dict(cfg.cluster.options))
    return out


def test_readme_popdask_commands_are_valid(capsys):
    commands = _readme_commands()
    subcommands = {argv[0] for argv in commands if argv and not argv[0].startswith("-")}
    assert {"run", "status"} <= subcommands
    cron_env = {e["name"]: e["value"] for e in _cron_container()["env"]}
    monthly = re.escape(cron_env["OUTPUT_PATH_TEMPLATE"]).replace(r"\{month\}", r"\d{4}-\d{2}")
    run_cfg = _run_config()
    kinds = set()
    for argv in commands:
        if "--version" in argv or "--help" in argv:
            with pytest.raises(SystemExit) as e:
                build_parser().parse_args(argv)
            assert e.value.code == 0
            continue
        args = _parse_popdask(argv)
        if args.command == "run":
            assert args.config in ("/config/run.yaml", "run.yaml")
            cfg = config_from_dict(run_cfg, overrides=args.set)
            kinds.add(cfg.cluster.kind)
        elif args.command == "status":
            assert json.loads(args.storage_options) == run_cfg["output"]["storage_options"]
            assert args.store == run_cfg["output"]["path"] or re.fullmatch(monthly, args.store)
    capsys.readouterr()
    assert kinds == {"address", "gateway"}, "the DaskJob's and the gateway's runs"


def test_readme_subcommands_and_flags_exist_in_the_cli():
    used: dict[str, set[str]] = {}
    for argv in _readme_commands():
        if argv and not argv[0].startswith("-"):
            flags = {a.split("=")[0] for a in argv if a.startswith("--")}
            used.setdefault(argv[0], set()).update(flags)
    assert used
    for sub, flags in used.items():
        r = subprocess.run(
            [sys.executable, "-m", "popdask.cli", sub, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert r.returncode == 0, f"popdask {sub} --help: {r.stderr}"
        for flag in flags - {"--help"}:  # the whole flag, not an abbreviation
            assert re.search(re.escape(flag) + r"(?![\w-])", r.stdout), f"popdask {sub}: {flag}"


def test_readme_names_match_the_manifests():
    readme = README.read_text()
    for _, d in _objects():
        assert d["metadata"]["name"] in readme, d["metadata"]["name"]
    for path in re.findall(r"-f (deploy/\S+)", readme):
        assert (ROOT / path).is_file(), path
    for path in re.findall(r"=(deploy/\S+)", readme):
        assert (ROOT / path).is_file(), path
    # the operator chart installed is the release whose CRD the DaskJob is validated against
    assert re.search(
        rf"dask/dask-kubernetes-operator\s*\\?\s*--version {re.escape(DASK_KUBERNETES_VERSION)}",
        readme,
    )
    assert f"dask/dask-gateway --version {DASK_GATEWAY_VERSION}" in readme
    assert "popdask-credentials" in readme and "--from-literal=AWS" not in readme
