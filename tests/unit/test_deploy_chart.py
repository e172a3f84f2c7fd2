"""Offline tests of deploy/helm/mxserve (../shared/docs/ecosystem.md §1.3): helm lint, values vs values.schema.json,
render every ci/*.yaml with helm-python-sdk, kubernetes-validate --strict for core kinds, CRDs against
../shared/schemas with jsonschema, LeaderWorkerSet pod templates as strict v1 PodTemplates, yamllint, and the
behaviour the chart promises (mxmoe args, probes, memory accounting, secrets, autoscaling on queue depth)."""
from __future__ import annotations

import json
import pathlib

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk==0.2.2 (offline Helm v4 SDK)")
kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
jsonschema = pytest.importorskip("jsonschema")

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "mxserve"
CRD_SCHEMAS = REPO.parent / "shared" / "schemas"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.33.0"
CRD_FILES = {"ServiceMonitor": "servicemonitor_v1.json", "PodMonitor": "podmonitor_v1.json",
             "ScaledObject": "scaledobject_v1alpha1.json"}


@pytest.fixture(scope="module")
def chart():
    c = helm.Chart.load(str(CHART))
    yield c
    c.close()


def _vals(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _render(chart, values: dict) -> tuple[list[dict], dict[str, str]]:
    out = chart.render(values, name="rel", namespace="llm", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, out


def _kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def test_ci_values_exist():
    assert {p.name for p in CI_FILES} >= {"default-values.yaml", "multinode-values.yaml"}


def test_helm_lint_clean():
    res = helm.lint(str(CHART), kube_version=KUBE_VERSION)
    assert not res["errors"], res
    for f in CI_FILES:
        res = helm.lint(str(CHART), _vals(f), kube_version=KUBE_VERSION)
        assert not res["errors"], (f.name, res)


@pytest.mark.parametrize("path", [CHART / "values.yaml"] + CI_FILES, ids=lambda p: p.name)
def test_values_match_schema(path):
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    merged = _vals(CHART / "values.yaml")
    _deep_merge(merged, _vals(path))
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(merged))
    assert not errors, [e.message for e in errors]


def _deep_merge(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_merge(a[k], v)
        else:
            a[k] = v


@pytest.mark.parametrize("bad", [{"engineArgs": {"tensorParallelSize": "two"}}, {"modelCache": {"bogus": 1}},
                                 {"autoscaling": {"mode": "vpa"}}])
def test_helm_enforces_schema(chart, bad):
    with pytest.raises(helm.HelmError):
        chart.render(bad, name="rel", namespace="llm")


@pytest.mark.parametrize("bad, msg", [
    ({"engineArgs": {"tensorParallelSize": 4}}, "resources.gpu=1 is less than"),
    ({"offload": {"enabled": True}}, "hostMemoryGiB > 0"),
    ({"multiNode": {"enabled": True}, "autoscaling": {"mode": "keda"}}, "not supported with multiNode"),
])
def test_render_rejects_inconsistent_values(chart, bad, msg):
    with pytest.raises(helm.HelmError, match=msg):
        chart.render(bad, name="rel", namespace="llm")


@pytest.mark.parametrize("path", CI_FILES, ids=lambda p: p.name)
def test_rendered_manifests_validate(chart, path):
    docs, _ = _render(chart, _vals(path))
    assert docs
    for d in docs:
        kind = d["kind"]
        if kind in CRD_FILES:
            if not CRD_SCHEMAS.is_dir():
                pytest.skip(f"CRD schemas folder {CRD_SCHEMAS} absent (../shared/schemas from the repo root)")
            schema = json.loads((CRD_SCHEMAS / CRD_FILES[kind]).read_text())
            errors = list(jsonschema.Draft7Validator(schema).iter_errors(d))
            assert not errors, (kind, [e.message for e in errors])
        elif kind == "LeaderWorkerSet":
            tmpl = d["spec"]["leaderWorkerTemplate"]
            assert tmpl["size"] >= 2
            for role in ("leaderTemplate", "workerTemplate"):  # no LWS schema here: validate the pod templates
                kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                             "template": tmpl[role]}, KUBE_VERSION, strict=True)
        else:
            kv.validate(d, KUBE_VERSION, strict=True)


def test_strict_validation_catches_unknown_fields():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"bogusField": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSION, strict=True)


def _container(dep):
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_default_deployment_contract(chart):
    docs, out = _render(chart, _vals(CHART / "ci" / "default-values.yaml"))
    dep = _kind(docs, "Deployment")
    c = _container(dep)
    assert c["command"] == ["vllm", "serve"]
    args = c["args"]
    assert args[0] == "mxserve/tiny-qwen3-moe-mxmoe"
    assert args[args.index("--quantization") + 1] == "mxmoe"
    assert args[args.index("--tensor-parallel-size") + 1] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 20 * 60  # long load + compile budget
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/dev/shm", "/models"}
    pvc = _kind(docs, "PersistentVolumeClaim")
    assert vols["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    svc = _kind(docs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert _kind(docs, "PodDisruptionBudget")["spec"]["selector"] == dep["spec"]["selector"]
    test_pod = _kind(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test_pod["spec"]["containers"][0]["args"][0]
    assert "/health" in script and "/v1/models" in script and svc["metadata"]["name"] in script
    notes = out["mxserve/templates/NOTES.txt"]
    assert "port-forward" in notes and "/v1/models" in notes and "/metrics" in notes


def test_offload_memory_secrets_keda(chart):
    v = _vals(CHART / "ci" / "offload-keda-values.yaml")
    docs, _ = _render(chart, v)
    c = _container(_kind(docs, "Deployment"))
    expect = v["resources"]["memoryBaseGiB"] + v["offload"]["hostMemoryGiB"] + v["shm"]["sizeGiB"]
    assert c["resources"]["limits"]["memory"] == f"{expect}Gi"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mxserve-api-key"
    assert c["args"][-2:] == v["extraArgs"] and "--enforce-eager" in c["args"]
    so = _kind(docs, "ScaledObject")
    assert "vllm:num_requests_waiting" in so["spec"]["triggers"][0]["metadata"]["query"]
    assert "replicas" not in _kind(docs, "Deployment")["spec"]  # the autoscaler owns replicas
    sm = _kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and sm["metadata"]["labels"]["release"]


def test_hpa_podmonitor(chart):
    docs, _ = _render(chart, _vals(CHART / "ci" / "hpa-podmonitor-values.yaml"))
    hpa = _kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    c = _container(_kind(docs, "Deployment"))
    assert c["resources"]["limits"]["memory"] == "64Gi" and "nvidia.com/mig-4g.71gb" in c["resources"]["limits"]
    assert not [d for d in docs if d["kind"] in ("PersistentVolumeClaim", "PodDisruptionBudget")]
    assert _kind(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_multinode_leaderworkerset(chart):
    docs, _ = _render(chart, _vals(CHART / "ci" / "multinode-values.yaml"))
    assert not [d for d in docs if d["kind"] == "Deployment"]
    lws = _kind(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader = lws["leaderTemplate"]["spec"]["containers"][0]
    cmd = leader["args"][0]
    assert "ray start --head" in cmd and "'--quantization' 'mxmoe'" in cmd
    assert "'--distributed-executor-backend' 'ray'" in cmd and "'--pipeline-parallel-size' '2'" in cmd
    assert leader["startupProbe"]["httpGet"]["path"] == "/health"
    worker = lws["workerTemplate"]["spec"]["containers"][0]
    assert "LWS_LEADER_ADDRESS" in worker["args"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert _kind(docs, "Service")["spec"]["selector"]["role"] == "leader"


def test_yamllint_values():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(REPO / "deploy" / "lintconf.yaml"))
    for f in [CHART / "values.yaml", CHART / "Chart.yaml"] + CI_FILES:
        problems = [str(p) for p in linter.run(f.read_text(), conf) if p.level == "error"]
        assert not problems, (f.name, problems)
