"""Deploy artifacts: the Helm chart as rendered, the systemd unit, the examples.

Renders helm/gdriver with the pinned helm in .tools/bin (installed by
deploy/tools.sh when missing) and asserts what operators rely on.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "gdriver"
HELM = ROOT / ".tools" / "bin" / "helm"
UNIT = ROOT / "deploy" / "systemd" / "gdriver.service"
RELEASE = "gdriver"
NAMESPACE = "workers"
CRD_APIS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
QUEUE_GAUGES = re.compile(r"\bgdriver_(?:queue_\w+|unknown_function_jobs)\b")
AGGREGATIONS = "sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile|count_values|limitk"


@pytest.fixture(scope="session", autouse=True)
def helm() -> Path:
    """The pinned helm; deploy/tools.sh installs it when it is missing."""
    if not HELM.exists():
        subprocess.run([str(ROOT / "deploy" / "tools.sh"), "helm"], check=True, timeout=600)
    assert HELM.exists(), "deploy/tools.sh did not install .tools/bin/helm"
    return HELM


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )


_VALUES_DIR = Path(tempfile.mkdtemp(prefix="gdriver-test-deploy-"))
atexit.register(shutil.rmtree, _VALUES_DIR, ignore_errors=True)


def _value_args(values: str) -> list[str]:
    if not values:
        return []
    path = _VALUES_DIR / f"{hashlib.sha256(values.encode()).hexdigest()[:16]}.yaml"
    path.write_text(values)
    return ["-f", str(path)]


@cache
def _render(values: str = "", apis: bool = True) -> tuple[tuple[str, str, str], ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if apis:
        for api in CRD_APIS:
            args += ["--api-versions", api]
    proc = _helm(*args, *_value_args(values))
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return tuple((d["kind"], d["metadata"]["name"], json.dumps(d)) for d in docs)


def render(values: dict[str, Any] | None = None, apis: bool = True) -> dict[str, dict]:
    """Render the chart; returns {kind: manifest} (names are unique per kind here)."""
    text = yaml.safe_dump(values) if values else ""
    out: dict[str, dict] = {}
    for kind, name, doc in _render(text, apis):
        key = kind if kind not in out else f"{kind}/{name}"
        out[key] = json.loads(doc)
    return out


def container(manifests: dict[str, dict]) -> dict:
    (c,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def all_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / "all-features-values.yaml").read_text())


def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def port_number(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


# --- probes, ports, service -----------------------------------------------------


@pytest.mark.parametrize("values", [None, "all"], ids=["defaults", "all-features"])
def test_probes_use_health_endpoints_on_metrics_port(values: str | None) -> None:
    m = render(all_values() if values else None)
    c = container(m)
    metrics_port = port_number(c, "metrics")
    expected = (all_values() if values else chart_defaults())["config"]["metrics_port"]
    assert metrics_port == expected
    paths = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in paths.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("metrics", metrics_port), probe


def test_console_is_a_container_port_but_not_on_the_service_by_default() -> None:
    m = render()
    c = container(m)
    assert port_number(c, "console") == 47300
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GDRIVER_CONSOLE_PORT"] == "47300"
    svc_ports = m["Service"]["spec"]["ports"]
    assert [p["name"] for p in svc_ports] == ["metrics"]
    assert 47300 not in {p["port"] for p in svc_ports}
    assert svc_ports[0]["targetPort"] == "metrics"
    assert m["Service"]["spec"]["publishNotReadyAddresses"] is True


def test_console_on_service_only_when_asked() -> None:
    m = render(all_values())
    ports = {p["name"]: p for p in m["Service"]["spec"]["ports"]}
    assert ports["console"]["port"] == 47301
    assert ports["metrics"]["port"] == 9500


def test_console_disabled_drops_its_port() -> None:
    c = container(render({"config": {"console_port": 0}, "service": {"exposeConsole": True}}))
    assert "console" not in {p["name"] for p in c["ports"]}


# --- config ---------------------------------------------------------------------------


def test_config_is_mounted_read_only_and_passed_with_configfile() -> None:
    values = all_values()
    m = render(values)
    c = container(m)
    pod = m["Deployment"]["spec"]["template"]["spec"]
    mount = next(v for v in c["volumeMounts"] if v["name"] == "config")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    args = c["args"]
    assert args[0] == "run"
    i = args.index("--configfile")
    (key,) = m["ConfigMap"]["data"]
    assert args[i + 1] == f"{mount['mountPath']}/{key}"
    assert yaml.safe_load(m["ConfigMap"]["data"][key]) == values["config"]
    # extraArgs come after the chart's own --configfile
    assert args[-2:] == ["--configfile", "/etc/gdriver-secrets/secrets.yml"]


def test_env_vars_from_values() -> None:
    c = container(render({"env": {"GDRIVER_LOGLEVEL": "DEBUG", "GDRIVER_INTERVAL": 2}}))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GDRIVER_LOGLEVEL"] == "DEBUG"
    assert env["GDRIVER_INTERVAL"] == "2"


def test_checksum_annotation_follows_the_config() -> None:
    def checksum(values: dict | None) -> str:
        tmpl = render(values)["Deployment"]["spec"]["template"]
        return tmpl["metadata"]["annotations"]["checksum/config"]

    base = checksum(None)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({"config": {"loglevel": "DEBUG"}}) != base
    assert checksum({"config": {"job_runtime_attributes": {"a.B.c": {"max_processes": 3}}}}) != base
    # values that do not touch the ConfigMap leave it alone
    assert checksum({"replicaCount": 3}) == base


# --- draining ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "graceful", "longest"),
    [
        (None, 30, 60),
        ({"config": {"graceful_timeout": 120}, "longestJobSeconds": 600}, 120, 600),
        ({"env": {"GDRIVER_GRACEFUL_TIMEOUT": "200"}}, 200, 60),
        ({"config": {"graceful_timeout": 45.5}, "longestJobSeconds": 0}, 46, 0),
    ],
)
def test_termination_grace_outlasts_the_drain(
    values: dict | None, graceful: int, longest: int
) -> None:
    pod = render(values)["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > graceful + longest


def test_explicit_termination_grace_too_short_fails() -> None:
    proc = _helm(
        "template",
        RELEASE,
        str(CHART),
        *_value_args(
            yaml.safe_dump({"terminationGracePeriodSeconds": 60, "longestJobSeconds": 60})
        ),
    )
    assert proc.returncode != 0
    assert "terminationGracePeriodSeconds" in proc.stderr
    ok = render({"terminationGracePeriodSeconds": 400, "longestJobSeconds": 60})
    assert ok["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 400


# --- security -----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, "all"], ids=["defaults", "all-features"])
def test_pod_is_non_root_with_read_only_root(values: str | None) -> None:
    m = render(all_values() if values else None)
    pod = m["Deployment"]["spec"]["template"]["spec"]
    c = container(m)
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp = next(v for v in c["volumeMounts"] if v["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert pod["automountServiceAccountToken"] is False
    assert c["resources"]["requests"]


# --- optional resources and API gating -----------------------------------------------------


MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_monitors_absent_without_the_api() -> None:
    values = all_values()
    without = render(values, apis=False)
    assert not MONITORING_KINDS & set(without)
    assert "ScaledObject" not in without
    # without the ScaledObject nothing else owns replicas
    assert without["Deployment"]["spec"]["replicas"] == values["replicaCount"]


def test_monitors_present_with_the_api() -> None:
    m = render(all_values())
    assert set(m) >= MONITORING_KINDS
    sm = m["ServiceMonitor"]["spec"]
    assert sm["endpoints"][0]["port"] == "metrics"
    assert sm["selector"]["matchLabels"] == m["Deployment"]["spec"]["selector"]["matchLabels"]
    assert "ScaledObject" in m and "PodDisruptionBudget" in m
    assert "replicas" not in m["Deployment"]["spec"]


def test_podmonitor_and_hpa() -> None:
    values = yaml.safe_load((CHART / "ci" / "hpa-values.yaml").read_text())
    m = render(values)
    assert "PodMonitor" in m and "ServiceMonitor" not in m
    assert render(values, apis=False).keys().isdisjoint({"PodMonitor", "PrometheusRule"})
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    ext = hpa["metrics"][0]["external"]
    assert ext["metric"]["name"] == "gdriver_queue_jobs"
    assert ext["target"]["type"] == "AverageValue"
    assert "replicas" not in m["Deployment"]["spec"]


def test_nothing_optional_by_default() -> None:
    m = render()
    assert set(m) == {"ConfigMap", "Deployment", "Service", "ServiceAccount", "Pod"}
    assert m["Pod"]["metadata"]["annotations"]["helm.sh/hook"] == "test"


# --- PromQL -----------------------------------------------------------------------------


def promql(m: dict[str, dict]) -> Iterator[tuple[str, str]]:
    for group in m["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule.get("record"), rule["expr"]
    for trigger in m.get("ScaledObject", {}).get("spec", {}).get("triggers", []):
        yield f"keda:{trigger['name']}", trigger["metadata"]["query"]


def enclosing_aggregation(expr: str, pos: int) -> tuple[str, str | None] | None:
    """The innermost aggregation around expr[pos]: (operator, grouping labels)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        ch = expr[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            if depth:
                depth -= 1
                continue
            head = re.search(rf"\b({AGGREGATIONS})\s*(?:(by|without)\s*\(([^)]*)\))?\s*$", expr[:i])
            if head:
                return head.group(1), head.group(3) if head.group(2) == "by" else None
    return None


def rule_values() -> list[dict]:
    return [all_values(), yaml.safe_load((CHART / "ci" / "hpa-values.yaml").read_text())]


@pytest.mark.parametrize("values", rule_values(), ids=["all-features", "hpa"])
def test_no_job_label_in_queries(values: dict) -> None:
    queries = list(promql(render(values)))
    assert len(queries) >= 5
    for name, expr in queries:
        for m in re.finditer(
            r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr
        ):
            labels = {x.strip() for x in m.group(1).split(",")}
            assert "job" not in labels, f"{name}: {m.group(0)}"
        for m in re.finditer(r"\{([^{}]*)\}", expr):
            names = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
            assert "job" not in names, f"{name}: {m.group(0)}"


@pytest.mark.parametrize("values", rule_values(), ids=["all-features", "hpa"])
def test_queue_gauges_aggregated_with_max_by_function(values: dict) -> None:
    seen = 0
    for name, expr in promql(render(values)):
        for m in QUEUE_GAUGES.finditer(expr):
            seen += 1
            agg = enclosing_aggregation(expr, m.start())
            assert agg is not None, f"{name}: {m.group(0)} is not aggregated"
            op, by = agg
            assert op == "max", f"{name}: {m.group(0)} aggregated with {op}, not max"
            assert by and "function" in {x.strip() for x in by.split(",")}, name
        assert not re.search(r"\bsum\s*(?:by\s*\([^)]*\)\s*)?\(\s*gdriver_queue", expr), name
    assert seen >= 4


def test_aggregation_walker_catches_sum() -> None:
    bad = 'sum by (function) (gdriver_queue_jobs{a="b"})'
    assert enclosing_aggregation(bad, bad.index("gdriver_queue")) == ("sum", "function")
    good = "sum(max by (namespace, function) (delta(gdriver_queue_jobs[5m])))"
    assert enclosing_aggregation(good, good.index("gdriver_queue")) == (
        "max",
        "namespace, function",
    )


def test_queries_are_scoped_to_the_release() -> None:
    for name, expr in promql(render(all_values())):
        if name == "GdriverAbsent":  # the user's own extra rule
            continue
        for m in re.finditer(r"\bgdriver_\w+\{([^}]*)\}", expr):
            assert f'namespace="{NAMESPACE}"' in m.group(1), name
            assert f'pod=~"{RELEASE}-' in m.group(1), name


def test_keda_filters_functions_and_quotes_metadata() -> None:
    so = render(all_values())["ScaledObject"]["spec"]
    queue = next(t for t in so["triggers"] if t["name"] == "queue")
    assert r'function=~"thumbnail|resize\\.v2"' in queue["metadata"]["query"]
    for trigger in so["triggers"]:
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
    assert so["minReplicaCount"] >= 1


# --- schema and template guards --------------------------------------------------------


BAD_VALUES = [
    {"replicaCount": "x"},
    {"replicaCount": -1},
    {"replicasCount": 2},
    {"image": {"repository": ""}},
    {"image": {"tag": 1.0}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"config": {"metrics_port": 0}},
    {"config": {"console_port": 70000}},
    {"config": {"gracefull_timeout": 30}},
    {"config": {"loglevel": "LOUD"}},
    {"config": {"metrics_bind": "127.0.0.1"}},
    {"env": {"GDRIVER_METRICS_PORT": "1"}},
    {"env": {"bad name": "1"}},
    {"service": {"type": "Ingress"}},
    {"service": {"port": 0}},
    {"serviceMonitor": {"enabled": "yes"}},
    {"serviceMonitor": {"interval": 30}},
    {"prometheusRule": {"alerts": {"gearmandDown": {"for": "soon"}}}},
    {"keda": {"minReplicaCount": 0}},
    {"keda": {"serverAddress": "prometheus:9090"}},
    {"podDisruptionBudget": {"maxUnavailable": "half"}},
    # rejected by the templates rather than the schema
    {"keda": {"enabled": True}, "hpa": {"enabled": True}},
    {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    {"terminationGracePeriodSeconds": 30},
]


@pytest.mark.parametrize("values", BAD_VALUES, ids=[json.dumps(v) for v in BAD_VALUES])
def test_bad_values_are_rejected(values: dict) -> None:
    args = _value_args(yaml.safe_dump(values))
    proc = _helm("template", RELEASE, str(CHART), *args, "--api-versions", CRD_APIS[0])
    assert proc.returncode != 0, f"helm template accepted {values}"


@pytest.mark.parametrize("values", [{"replicaCount": "x"}, {"unknownKey": 1}])
def test_lint_rejects_bad_values(values: dict) -> None:
    proc = _helm("lint", "--strict", str(CHART), *_value_args(yaml.safe_dump(values)))
    assert proc.returncode != 0


def test_lint_accepts_defaults() -> None:
    proc = _helm("lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# settings the chart leaves out of `config` on purpose: it passes --configfile
# itself, and a container must not daemonize nor log to a file
CHART_EXCLUDED_KEYS = {"configfile", "daemonize", "pidfile", "logfile"}


def test_chart_config_keys_follow_gdriver_settings() -> None:
    from gdriver.config import KEYS

    schema = json.loads((CHART / "values.schema.json").read_text())
    chart_keys = set(schema["properties"]["config"]["properties"])
    assert chart_keys == set(KEYS) - CHART_EXCLUDED_KEYS


def check_config(config: dict, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`gdriver check-config` on config, without the worker code (not installed here)."""
    config = {**config, "namespaces": [], "lib": []}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    return subprocess.run(
        [sys.executable, "-m", "gdriver", "check-config", "--configfile", str(path)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["defaults", "all-features", "hpa", "minimal"])
def test_rendered_config_passes_check_config(name: str, tmp_path: Path) -> None:
    values = None
    if name != "defaults":
        values = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    config = yaml.safe_load(render(values)["ConfigMap"]["data"]["config.yml"])
    proc = check_config(config, tmp_path)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)
    c = container(render(values))
    assert settings["metrics_port"] == port_number(c, "metrics")


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    example = yaml.safe_load((ROOT / "deploy" / "config.example.yml").read_text())
    proc = check_config(example, tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_examples_match_the_chart_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_schema = schema["properties"]["config"]
    example = yaml.safe_load((ROOT / "deploy" / "config.example.yml").read_text())
    jsonschema.validate(example, config_schema)
    jsonschema.validate(chart_defaults(), schema)
    # every variable in the env example is a known setting
    keys = set(config_schema["properties"])
    for line in (ROOT / "deploy" / "systemd" / "gdriver.env").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("# ") or line == "#":
            continue
        m = re.fullmatch(r"#?(GDRIVER_[A-Z_]+)=(.*)", line)
        assert m, f"not KEY=VALUE: {line!r}"
        assert m.group(1).removeprefix("GDRIVER_").lower() in keys, line


# --- systemd unit and Dockerfile ------------------------------------------------------


def unit_directives() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def seconds(value: str) -> float:
    total = 0.0
    for n, unit in re.findall(r"(\d+)\s*(min|ms|s|h)?", value):
        total += int(n) * {"": 1, "s": 1, "min": 60, "h": 3600, "ms": 0.001}[unit]
    return total


def test_systemd_unit_directives() -> None:
    svc = unit_directives()["Service"]

    def one(key: str) -> str:
        assert key in svc, f"{key}= missing"
        return svc[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillMode") == "mixed"
    assert one("Restart") == "on-failure"
    assert "78" in one("RestartPreventExitStatus").split()
    assert one("EnvironmentFile") == "-/etc/default/gdriver"
    assert one("ConfigurationDirectory") == "gdriver"
    exec_start = one("ExecStart").split()
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/gdriver")
    assert "--configfile" in exec_start
    assert exec_start[exec_start.index("--configfile") + 1] == "/etc/gdriver/config.yml"
    assert seconds(one("WatchdogSec")) > 0
    drain = chart_defaults()["config"]["graceful_timeout"]
    assert seconds(one("TimeoutStopSec")) > drain
    assert one("DynamicUser") == "yes"
    families = one("RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} == set(families)
    for key in (
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
    ):
        assert one(key) == "yes", key
    assert one("CapabilityBoundingSet") == ""
    assert "@system-service" in svc["SystemCallFilter"]


def test_dockerfile_basics() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"python:3\.11-slim", text)
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^EXPOSE 9464 47300$", text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "gdriver"\]$', text, re.M)
    pod = render()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001
