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
        if name == "GdriverThumbnailSlow":  # the user's own extra rule
            continue
        for m in re.finditer(r"\bgdriver_\w+\{([^}]*)\}", expr):
            assert f'namespace="{NAMESPACE}"' in m.group(1), name
            assert f'pod=~"{RELEASE}-' in m.group(1), name


def test_keda_filters_functions_and_quotes_metadata() -> None:
    so = render(all_values())["ScaledObject"]["spec"]
    queue = next(t for t in so["triggers"] if t["name"] == "queue")
    assert (
        r'function=~"myapp\\.workers\\.images\\.Images\\.thumbnail|resize\\.v2"'
        in (queue["metadata"]["query"])
    )
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


# the worker code the deploy examples configure, laid out as in the README
# (myapp/workers/images.py and so on): their job and class keys must name it
EXAMPLE_WORKERS = {
    "images.py": """
from gdriver import Worker, job


class Images(Worker):
    @job
    def thumbnail(self, job, workload):
        return workload

    @job(min_processes=0, max_processes=15, process_group="img")
    def resize(self, job, workload):
        return workload
""",
    "mail.py": """
from gdriver import Worker, job


class Mail(Worker):
    @job
    def send(self, job, workload):
        return b""
""",
}


def example_workers(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    package = lib / "myapp" / "workers"
    package.mkdir(parents=True)
    (lib / "myapp" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    for name, code in EXAMPLE_WORKERS.items():
        (package / name).write_text(code)
    return lib


def check_config(config: dict, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`gdriver check-config` on config, with the README's example worker code."""
    lib = example_workers(tmp_path)
    config = {**config, "namespaces": ["myapp.workers"], "lib": [str(lib)]}
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
    # soft = hard: ~@resources blocks setrlimit, so gdriver cannot raise it itself
    nofile = one("LimitNOFILE")
    assert ":" not in nofile and int(nofile) >= 16384
    assert "@resources" in " ".join(svc["SystemCallFilter"])
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
    # the console listens on loopback only: nothing to expose
    assert re.findall(r"^EXPOSE .*$", text, re.M) == ["EXPOSE 9464"]
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "gdriver"\]$', text, re.M)
    pod = render()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001


def test_dockerfile_is_reproducible_and_labelled() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    installs = [line for line in joined.splitlines() if re.search(r"\bpip install\b", line)]
    installs = [line for line in installs if not line.lstrip().startswith("#")]
    assert installs, "no pip install in the Dockerfile"
    for line in installs:
        # every install is either the hashed lock or gdriver itself without dependencies
        assert ("--require-hashes" in line and "requirements.lock" in line) or (
            "--no-deps" in line and "--no-build-isolation" in line
        ), line
    assert re.search(r"^COPY deploy/requirements\.lock ", text, re.M)
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!deploy/requirements.lock" in ignore
    for key, arg in (("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION")):
        assert re.search(rf"^ARG {arg}\b", text, re.M), arg
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in text, key
    # ps for kubectl exec debugging
    assert re.search(r"apt-get install [^\n]*\bprocps\b", joined)


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """deploy/requirements.lock: normalised name -> (version, hashes)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "deploy" / "requirements.lock").read_text())
    pins = {}
    for line in text.splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", line)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            pins[name] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
        else:
            assert not line.strip() or line.lstrip().startswith("#"), f"not a pin: {line!r}"
    return pins


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = lock_pins()
    wanted = project["project"]["dependencies"] + project["build-system"]["requires"]
    for spec in wanted:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in deploy/requirements.lock: regenerate it"
        version, hashes = pins[name]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} vs {spec}"
    for name, (_, hashes) in pins.items():
        assert hashes, f"{name} has no --hash"


# --- alerts, runbook, plain rule file -----------------------------------------------


SHIPPED_ALERTS = {
    "GdriverDown",
    "GdriverJobSaturated",
    "GdriverUnknownFunctionJobs",
    "GdriverGearmandDown",
    "GdriverWorkersCrashLooping",
    "GdriverBacklogGrowing",
}


def shipped_rules(values: dict | None = None) -> list[dict]:
    m = render({"prometheusRule": {"enabled": True}, **(values or {})})
    return [r for g in m["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]


def test_every_alert_links_its_runbook_section() -> None:
    runbook = (ROOT / "deploy" / "RUNBOOK.md").read_text()
    headings = set(re.findall(r"^## (\w+)$", runbook, re.M))
    base = "https://git.example.com/gdriver/deploy/RUNBOOK.md"
    rules = shipped_rules({"prometheusRule": {"enabled": True, "runbookBaseUrl": base}})
    assert {r["alert"] for r in rules} == SHIPPED_ALERTS
    for rule in rules:
        name = rule["alert"]
        assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}", name
        assert name in headings, f"deploy/RUNBOOK.md has no section '## {name}'"
        section = runbook.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert "look at" in section.lower() and "do" in section.lower(), name


def test_gdriver_down_covers_down_and_unscraped_targets() -> None:
    (down,) = [r for r in shipped_rules() if r["alert"] == "GdriverDown"]
    assert re.search(r"\(up\{[^}]*\}\) == 0", down["expr"])
    assert re.search(r"absent\(up\{", down["expr"])


@pytest.mark.parametrize("values", rule_values(), ids=["all-features", "hpa"])
def test_queue_queries_only_trust_pods_that_reach_gearmand(values: dict) -> None:
    for name, expr in promql(render(values)):
        if name == "GdriverThumbnailSlow" or not QUEUE_GAUGES.search(expr):
            continue
        guards = expr.count("gdriver_gearmand_up{")
        assert guards and "== 1" in expr, f"{name}: queue gauges not guarded by gearmand_up"
        # each queue gauge is joined with the guard before it is aggregated
        for m in QUEUE_GAUGES.finditer(expr):
            rest = expr[m.end() :]
            assert re.match(r"(?:\{[^}]*\}(?:\[\w+\])?\)?)\s*and on \(namespace, pod\)", rest), (
                f"{name}: {expr[m.start() : m.end() + 80]}"
            )


def test_saturation_joins_jobs_to_their_functions() -> None:
    (rule,) = [r for r in shipped_rules() if r["alert"] == "GdriverJobSaturated"]
    assert "gdriver_function_info{" in rule["expr"]
    assert "on (namespace, pod, job_name)" in rule["expr"]
    assert "and on (namespace)\n" not in rule["expr"]


def test_prometheus_rule_without_the_api_says_why() -> None:
    proc = _helm(
        "template",
        RELEASE,
        str(CHART),
        *_value_args(yaml.safe_dump({"prometheusRule": {"enabled": True}})),
    )
    assert proc.returncode == 0, proc.stderr
    assert "kind: PrometheusRule" not in proc.stdout
    assert "no PrometheusRule was rendered" in proc.stdout
    assert "monitoring.coreos.com/v1" in proc.stdout
    assert "deploy/prometheus/gdriver-rules.yml" in proc.stdout
    # and nothing of the kind with the API, or with the rule disabled
    assert "no PrometheusRule was rendered" not in _helm("template", RELEASE, str(CHART)).stdout


def test_plain_rule_file_matches_the_chart_and_loads() -> None:
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import manifests
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    path = ROOT / "deploy" / "prometheus" / "gdriver-rules.yml"
    assert path.read_text() == manifests.plain_rules(str(HELM)), (
        "deploy/prometheus/gdriver-rules.yml differs from the chart: "
        "run deploy/manifests.py plain-rules"
    )
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == SHIPPED_ALERTS
    for rule in rules:
        assert 'job="gdriver"' in rule["expr"]
        assert "pod" not in re.findall(r"\bon \(([^)]*)\)", rule["expr"])
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: run deploy/tools.sh")
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- autoscaling: replica scaling stays behind in-pod scaling ------------------------------


@pytest.mark.parametrize("kind", ["keda", "hpa"])
def test_autoscaler_defaults_leave_bursts_to_in_pod_scaling(kind: str) -> None:
    defaults = chart_defaults()
    if kind == "keda":
        m = render({"keda": {"enabled": True}})
        spec = m["ScaledObject"]["spec"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        queue = next(t for t in spec["triggers"] if t["name"] == "queue")
        # an empty answer (no gearmand reachable) holds the replicas instead of scaling in
        assert queue["metadata"]["ignoreNullValues"] == "false"
        assert "or on () (0 * group(" in queue["metadata"]["query"]
    else:
        m = render({"hpa": {"enabled": True}})
        behavior = m["HorizontalPodAutoscaler"]["spec"]["behavior"]
    interval = defaults["config"]["interval"]
    # adding pods waits for several observer polls; removing them waits far longer
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] >= 10 * interval
    assert (
        behavior["scaleDown"]["stabilizationWindowSeconds"]
        > behavior["scaleUp"]["stabilizationWindowSeconds"]
    )
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_keda_trigger_metadata_may_override_null_handling() -> None:
    so = render({"keda": {"enabled": True, "triggerMetadata": {"ignoreNullValues": "true"}}})
    queue = next(t for t in so["ScaledObject"]["spec"]["triggers"] if t["name"] == "queue")
    assert queue["metadata"]["ignoreNullValues"] == "true"


# --- function names: one spelling everywhere ------------------------------------------------


EXAMPLE_NAMES = {
    "myapp.workers",
    "myapp.workers.images.Images",
    "myapp.workers.images.Images.thumbnail",
    "myapp.workers.images.Images.resize",
    "myapp.workers.images.Images.img",
    "myapp.workers.mail.Mail",
    "myapp.workers.mail.Mail.send",
}


def test_example_names_follow_the_readme_layout() -> None:
    files = [
        ROOT / "README.md",
        ROOT / "deploy" / "README.md",
        ROOT / "deploy" / "config.example.yml",
        ROOT / "deploy" / "systemd" / "gdriver.env",
        CHART / "values.yaml",
        *sorted((CHART / "ci").glob("*.yaml")),
    ]
    for path in files:
        for name in re.findall(r"\bmyapp\.workers(?:\.\w+)*", path.read_text()):
            assert name in EXAMPLE_NAMES, f"{path.relative_to(ROOT)}: {name}"
    # the README's layout: myapp/workers/images.py holds class Images
    assert "# myapp/workers/images.py" in (ROOT / "README.md").read_text()
    assert "class Images(Worker)" in EXAMPLE_WORKERS["images.py"]


# --- systemd: /proc as the unit mounts it ----------------------------------------------------


def unit_proc_options() -> str:
    svc = unit_directives()["Service"]
    opts = []
    if "ProtectProc" in svc and svc["ProtectProc"][-1] != "default":
        opts.append(f"hidepid={svc['ProtectProc'][-1]}")
    if svc.get("ProcSubset", ["all"])[-1] == "pid":
        opts.append("subset=pid")
    return ",".join(opts) or "defaults"


def process_series_under_proc(options: str) -> int:
    """process_* lines gdriver's registry exports with /proc mounted with options."""
    code = (
        "from prometheus_client import generate_latest\n"
        "from gdriver.metrics import Metrics\n"
        "text = generate_latest(Metrics().registry).decode()\n"
        "print(sum(line.startswith('process_') for line in text.splitlines()))\n"
    )
    script = f'mount -t proc -o {options} proc /proc && exec "$0" -c "$1"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, code],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a proc instance needs root")
def test_unit_proc_mount_keeps_process_metrics() -> None:
    # ProcSubset=pid hides /proc/stat, and prometheus-client then drops process_*
    assert process_series_under_proc("hidepid=invisible,subset=pid") == 0
    assert process_series_under_proc(unit_proc_options()) >= 5
