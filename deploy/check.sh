#!/usr/bin/env bash
# Offline checks of the deploy artifacts: Helm chart, alert rules, systemd unit.
# Prerequisites: deploy/tools.sh (helm, promtool, systemd-analyze) and the
# project venv with the test extra (kubernetes-validate, jsonschema, PyYAML).
# Runs every check, then exits 1 if any failed (listing them).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELM="${HELM:-$ROOT/.tools/bin/helm}"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
KUBE_VALIDATE="$VENV/bin/kubernetes-validate"
CHART="$ROOT/helm/gdriver"
UNIT="$ROOT/deploy/systemd/gdriver.service"

# Kubernetes versions the manifests are validated against: the chart's minimum
# (Chart.yaml kubeVersion) and the newest kubernetes-validate has schemas for.
K8S_VERSIONS=(1.29.0 1.37.0)
# APIs the optional templates are gated on
API_VERSIONS=(--api-versions monitoring.coreos.com/v1 --api-versions keda.sh/v1alpha1)
# custom resources kubernetes-validate has no schema for; deploy/manifests.py
# checks them instead. Any other "no schema" warning is a failure.
CRD_KINDS_RE='kind (ServiceMonitor|PodMonitor|PrometheusRule) with api version monitoring\.coreos\.com/v1|kind ScaledObject with api version keda\.sh/v1alpha1'
# systemd-analyze security exposure score must be at or below this (1.1 today)
SECURITY_MAX=1.3
RELEASE=gdriver
NAMESPACE=gdriver

failures=()
pass() { echo "ok   $*"; }
fail() {
    echo "FAIL $*" >&2
    failures+=("$*")
}
section() { printf '\n== %s\n' "$*"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- prerequisites ----------------------------------------------------------
section "tools"
missing=()
[ -x "$HELM" ] || missing+=("helm ($HELM): run deploy/tools.sh")
command -v promtool >/dev/null || missing+=("promtool: run deploy/tools.sh")
command -v systemd-analyze >/dev/null || missing+=("systemd-analyze: run deploy/tools.sh")
[ -x "$KUBE_VALIDATE" ] || missing+=("kubernetes-validate ($KUBE_VALIDATE): pip install -e '.[test]' into .venv")
"$PY" -c 'import jsonschema, yaml' 2>/dev/null || missing+=("jsonschema/PyYAML in $VENV: pip install -e '.[test]'")
if [ "${#missing[@]}" -gt 0 ]; then
    for m in "${missing[@]}"; do echo "check.sh: missing $m" >&2; done
    exit 2
fi
pass "$("$HELM" version --short), $(promtool --version 2>&1 | head -1), $(systemd-analyze --version | head -1), kubernetes-validate $("$KUBE_VALIDATE" --version 2>&1)"

# values sets: the defaults plus every ci/*-values.yaml
value_sets=(default)
for f in "$CHART"/ci/*-values.yaml; do
    value_sets+=("$f")
done
values_args() { [ "$1" = default ] && return 0; printf -- '-f\n%s\n' "$1"; }
label() { [ "$1" = default ] && echo "defaults" || basename "$1"; }

# --- helm lint ----------------------------------------------------------------
section "helm lint --strict"
for vs in "${value_sets[@]}"; do
    mapfile -t vargs < <(values_args "$vs")
    for kv in "${K8S_VERSIONS[@]}"; do
        if out="$("$HELM" lint --strict --kube-version "$kv" "$CHART" "${vargs[@]}" 2>&1)"; then
            pass "lint $(label "$vs") (k8s $kv)"
        else
            echo "$out" >&2
            fail "helm lint --strict $(label "$vs") (k8s $kv)"
        fi
    done
done

# --- render, kubernetes-validate, custom resources ---------------------------
section "helm template | kubernetes-validate --strict; custom resources"
for vs in "${value_sets[@]}"; do
    mapfile -t vargs < <(values_args "$vs")
    name="$(label "$vs")"
    for kv in "${K8S_VERSIONS[@]}"; do
        rendered="$work/$name-$kv.yaml"
        if ! "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$kv" \
            "${API_VERSIONS[@]}" "${vargs[@]}" >"$rendered" 2>"$work/err"; then
            cat "$work/err" >&2
            fail "helm template $name (k8s $kv)"
            continue
        fi
        out="$("$KUBE_VALIDATE" --strict --quiet --kubernetes-version "$kv" - <"$rendered" 2>&1)"
        rc=$?
        unexpected="$(printf '%s\n' "$out" | grep -v '^$' | grep -Ev "^WARN .*Couldn't find schema for ($CRD_KINDS_RE) " || true)"
        if [ "$rc" != 0 ] || [ -n "$unexpected" ]; then
            printf '%s\n' "$out" >&2
            fail "kubernetes-validate --strict -k $kv: $name"
        else
            pass "kubernetes-validate --strict -k $kv: $name"
        fi
        if out="$("$PY" "$ROOT/deploy/manifests.py" crds "$rendered" 2>&1)"; then
            pass "custom resources: $name (k8s $kv)"
        else
            printf '%s\n' "$out" >&2
            fail "custom resources: $name (k8s $kv)"
        fi
    done
done

# --- alert rules --------------------------------------------------------------
section "promtool check rules / test rules"
# the unit tests expect the default thresholds, release and namespace gdriver
rules_dir="$work/rules"
if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${API_VERSIONS[@]}" \
    --set prometheusRule.enabled=true >"$work/rules.yaml" 2>"$work/err" &&
    "$PY" "$ROOT/deploy/manifests.py" rules "$work/rules.yaml" "$rules_dir" >/dev/null; then
    if promtool check rules "$rules_dir/$RELEASE.yml"; then
        pass "promtool check rules (defaults)"
    else
        fail "promtool check rules (defaults)"
    fi
    cp "$CHART/ci/alerts-test.yml" "$rules_dir/"
    if (cd "$rules_dir" && promtool test rules alerts-test.yml); then
        pass "promtool test rules helm/gdriver/ci/alerts-test.yml"
    else
        fail "promtool test rules helm/gdriver/ci/alerts-test.yml"
    fi
else
    cat "$work/err" >&2
    fail "render/extract the PrometheusRule (defaults)"
fi
# the plain rule file (Prometheus without the Operator): generated from the
# chart, so it must match a fresh render and load in promtool
if "$PY" "$ROOT/deploy/manifests.py" plain-rules --check; then
    pass "deploy/prometheus/gdriver-rules.yml matches the chart"
else
    fail "deploy/prometheus/gdriver-rules.yml differs from the chart (deploy/manifests.py plain-rules)"
fi
if promtool check rules "$ROOT/deploy/prometheus/gdriver-rules.yml"; then
    pass "promtool check rules deploy/prometheus/gdriver-rules.yml"
else
    fail "promtool check rules deploy/prometheus/gdriver-rules.yml"
fi
# every values set that renders a rule (with its own thresholds and extra rules)
for vs in "${value_sets[@]}"; do
    name="$(label "$vs")"
    rendered="$work/$name-${K8S_VERSIONS[0]}.yaml"
    [ -f "$rendered" ] && grep -q '^kind: PrometheusRule' "$rendered" || continue
    dir="$work/rules-$name"
    if "$PY" "$ROOT/deploy/manifests.py" rules "$rendered" "$dir" >/dev/null &&
        promtool check rules "$dir"/*.yml; then
        pass "promtool check rules ($name)"
    else
        fail "promtool check rules ($name)"
    fi
done

# --- systemd unit ---------------------------------------------------------------
section "systemd unit"
unit_copy="$work/gdriver.service"
# verify needs ExecStart to exist: point it at a real executable
sed -E 's#^ExecStart=[^ ]+#ExecStart=/bin/true#' "$UNIT" >"$unit_copy"
if ! grep -q '^ExecStart=/bin/true ' "$unit_copy"; then
    fail "could not rewrite ExecStart in $UNIT"
fi
# systemd-analyze verify prints problems (unknown keys, bad values) with rc 0:
# any output at all is a failure
out="$(cd "$work" && systemd-analyze verify ./gdriver.service 2>&1)"
rc=$?
if [ "$rc" = 0 ] && [ -z "$out" ]; then
    pass "systemd-analyze verify"
else
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify (rc $rc, output above)"
fi
out="$(cd "$work" && systemd-analyze security --offline=true ./gdriver.service 2>&1)"
score="$(printf '%s\n' "$out" | sed -nE 's/.*Overall exposure level for [^:]*: ([0-9]+\.[0-9]+).*/\1/p' | tail -1)"
if [ -z "$score" ]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze security: no score found"
elif awk -v s="$score" -v m="$SECURITY_MAX" 'BEGIN { exit !(s <= m) }'; then
    pass "systemd-analyze security: exposure $score (<= $SECURITY_MAX)"
else
    printf '%s\n' "$out" >&2
    fail "systemd-analyze security: exposure $score > $SECURITY_MAX"
fi

# --- summary --------------------------------------------------------------------
echo
if [ "${#failures[@]}" -gt 0 ]; then
    echo "check.sh: ${#failures[@]} check(s) failed:" >&2
    for f in "${failures[@]}"; do echo "  - $f" >&2; done
    exit 1
fi
echo "check.sh: all deploy checks passed"
