#!/usr/bin/env python3
"""Offline checks on `helm template` output that kubernetes-validate cannot do.

    manifests.py crds FILE           check the custom resources in FILE
    manifests.py rules FILE OUTDIR   write each PrometheusRule's spec to OUTDIR/<name>.yml
    manifests.py plain-rules [--check]
                                     render the chart's alerts for a plain Prometheus
                                     (no Operator) into deploy/prometheus/gdriver-rules.yml;
                                     --check fails when that file differs from the chart

kubernetes-validate knows only the built-in kinds and merely warns about the
others. `crds` checks the custom resources this chart renders (ServiceMonitor,
PodMonitor, PrometheusRule, ScaledObject) against the subset of their upstream
CRD schemas (prometheus-operator monitoring.coreos.com/v1, KEDA keda.sh/v1alpha1)
that the chart uses: known fields only, required fields, types and enums. Any
other unknown kind is an error, so a typo in a built-in apiVersion cannot slip
through as "no schema, skipped".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# kinds kubernetes-validate checks itself (its schemas cover the core API)
BUILTIN = {
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "Pod"),
    ("apps/v1", "Deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
}

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
STRLIST = {"type": "array", "items": STR}
DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
    "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": STRMAP, "matchExpressions": {"type": "array", "items": OBJ}},
}
RELABEL_ACTIONS = (
    "Replace", "Keep", "Drop", "HashMod", "LabelMap", "LabelDrop", "LabelKeep",
    "Lowercase", "Uppercase", "KeepEqual", "DropEqual",
)  # fmt: skip
RELABEL = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "action": {"enum": [v for a in RELABEL_ACTIONS for v in (a.lower(), a)]},
            "modulus": INT,
            "regex": STR,
            "replacement": STR,
            "separator": STR,
            "sourceLabels": STRLIST,
            "targetLabel": STR,
        },
    },
}
ENDPOINT_COMMON = {
    "authorization": OBJ,
    "basicAuth": OBJ,
    "bearerTokenSecret": OBJ,
    "enableHttp2": BOOL,
    "filterRunning": BOOL,
    "followRedirects": BOOL,
    "honorLabels": BOOL,
    "honorTimestamps": BOOL,
    "interval": DURATION,
    "metricRelabelings": RELABEL,
    "noProxy": STR,
    "oauth2": OBJ,
    "params": OBJ,
    "path": STR,
    "port": STR,
    "proxyConnectHeader": OBJ,
    "proxyFromEnvironment": BOOL,
    "proxyUrl": STR,
    "relabelings": RELABEL,
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "scrapeTimeout": DURATION,
    "targetPort": {"type": ["integer", "string"]},
    "tlsConfig": OBJ,
    "trackTimestampsStaleness": BOOL,
}
MONITOR_COMMON = {
    "attachMetadata": OBJ,
    "bodySizeLimit": STR,
    "jobLabel": STR,
    "keepDroppedTargets": INT,
    "labelLimit": INT,
    "labelNameLengthLimit": INT,
    "labelValueLengthLimit": INT,
    "namespaceSelector": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"any": BOOL, "matchNames": STRLIST},
    },
    "nativeHistogramBucketLimit": INT,
    "nativeHistogramMinBucketFactor": {},
    "podTargetLabels": STRLIST,
    "sampleLimit": INT,
    "scrapeClass": STR,
    "scrapeClassicHistograms": BOOL,
    "scrapeProtocols": STRLIST,
    "selector": LABEL_SELECTOR,
    "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
    "targetLimit": INT,
    "fallbackScrapeProtocol": STR,
    "convertClassicHistogramsToNHCB": BOOL,
}


def _spec(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": required,
    }


SERVICE_MONITOR = _spec(
    {
        **MONITOR_COMMON,
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {**ENDPOINT_COMMON, "bearerTokenFile": STR},
            },
        },
        "targetLabels": STRLIST,
        "serviceDiscoveryRole": {"enum": ["Endpoints", "EndpointSlice"]},
    },
    ["selector", "endpoints"],
)
POD_MONITOR = _spec(
    {
        **MONITOR_COMMON,
        "podMetricsEndpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {**ENDPOINT_COMMON, "portNumber": INT},
            },
        },
    },
    ["selector", "podMetricsEndpoints"],
)
PROMETHEUS_RULE = _spec(
    {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "limit": INT,
                    "partial_response_strategy": STR,
                    "query_offset": DURATION,
                    "labels": STRMAP,
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["expr"],
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {
                                "alert": STR,
                                "record": STR,
                                "expr": {"type": ["string", "integer"]},
                                "for": DURATION,
                                "keep_firing_for": DURATION,
                                "labels": STRMAP,
                                "annotations": STRMAP,
                            },
                        },
                    },
                },
            },
        }
    },
    ["groups"],
)
SCALED_OBJECT = _spec(
    {
        "scaleTargetRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "apiVersion": STR,
                "kind": STR,
                "name": STR,
                "envSourceContainerName": STR,
            },
        },
        "pollingInterval": INT,
        "cooldownPeriod": INT,
        "initialCooldownPeriod": INT,
        "idleReplicaCount": INT,
        "minReplicaCount": INT,
        "maxReplicaCount": INT,
        "advanced": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"name": STR, "behavior": OBJ},
                },
                "restoreToOriginalReplicaCount": BOOL,
                "scalingModifiers": OBJ,
            },
        },
        "fallback": {
            "type": "object",
            "required": ["failureThreshold", "replicas"],
            "properties": {"failureThreshold": INT, "replicas": INT, "behavior": STR},
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "metadata"],
                "properties": {
                    "type": STR,
                    "name": STR,
                    "useCachedMetrics": BOOL,
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    # KEDA reads trigger metadata as map[string]string
                    "metadata": STRMAP,
                    "authenticationRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"name": STR, "kind": STR},
                    },
                },
            },
        },
    },
    ["scaleTargetRef", "triggers"],
)

CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": STR,
        "labels": STRMAP,
        "annotations": STRMAP,
    },
}


def load(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def check_crds(path: str) -> int:
    errors = 0
    for doc in load(path):
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
        if key in BUILTIN:
            continue
        schema = CUSTOM.get(key)
        if schema is None:
            print(f"ERROR {path}: {name}: unexpected apiVersion/kind {key[0]}/{key[1]}")
            errors += 1
            continue
        whole = {
            "type": "object",
            "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": STR, "kind": STR, "metadata": METADATA, "spec": schema},
        }
        found = sorted(jsonschema.Draft7Validator(whole).iter_errors(doc), key=str)
        for err in found:
            where = ".".join(str(p) for p in err.absolute_path) or "(root)"
            print(f"ERROR {path}: {name}: {where}: {err.message}")
        errors += len(found)
        if not found:
            print(f"INFO {path}: {name} passed ({key[0]} subset schema)")
    return 1 if errors else 0


def extract_rules(path: str, outdir: str) -> int:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for doc in load(path):
        if doc.get("kind") == "PrometheusRule":
            target = out / f"{doc['metadata']['name']}.yml"
            target.write_text(yaml.safe_dump(doc["spec"], sort_keys=False))
            print(target)
            n += 1
    if not n:
        print(f"ERROR {path}: no PrometheusRule rendered", file=sys.stderr)
        return 1
    return 0


ROOT = Path(__file__).resolve().parent.parent
PLAIN_RULES = ROOT / "deploy" / "prometheus" / "gdriver-rules.yml"
# a plain scrape config names its job "gdriver" and tells processes apart by
# `instance`; there is no namespace label (the rules group by it harmlessly)
PLAIN_VALUES = [
    "--set", "prometheusRule.enabled=true",
    "--set-string", 'metricsSelector=job="gdriver"',
    "--set", "metricsInstanceLabel=instance",
]  # fmt: skip
PLAIN_HEADER = """\
# gdriver alerting rules for Prometheus without the Prometheus Operator.
# Generated from helm/gdriver (templates/prometheusrule.yaml, default thresholds)
# by `deploy/manifests.py plain-rules`; do not edit: change the chart and
# regenerate (CI fails when this file and the chart differ).
#
# Assumes a scrape job named "gdriver" (job="gdriver") with one target per gdriver
# process (told apart by `instance`). Load it with rule_files: in prometheus.yml;
# see deploy/README.md.
"""


def plain_rules(helm: str | None = None) -> str:
    """The chart's alert rules as a plain Prometheus rule file."""
    helm = helm or str(ROOT / ".tools" / "bin" / "helm")
    proc = subprocess.run(
        [helm, "template", "gdriver", str(ROOT / "helm" / "gdriver"),
         "--api-versions", "monitoring.coreos.com/v1", *PLAIN_VALUES,
         "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    (rule,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return PLAIN_HEADER + yaml.dump(
        rule["spec"], Dumper=_BlockDumper, sort_keys=False, width=1000, indent=2
    )


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL) as literal blocks, as in the chart."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def write_plain_rules(check: bool) -> int:
    text = plain_rules()
    if check:
        if not PLAIN_RULES.exists() or PLAIN_RULES.read_text() != text:
            print(f"ERROR {PLAIN_RULES} differs from the chart: run deploy/manifests.py "
                  "plain-rules", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{PLAIN_RULES} matches the chart")
        return 0
    PLAIN_RULES.parent.mkdir(parents=True, exist_ok=True)
    PLAIN_RULES.write_text(text)
    print(PLAIN_RULES)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "crds":
        return check_crds(argv[1])
    if len(argv) == 3 and argv[0] == "rules":
        return extract_rules(argv[1], argv[2])
    if argv[:1] == ["plain-rules"] and argv[1:] in ([], ["--check"]):
        return write_plain_rules(check=argv[1:] == ["--check"])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
