#!/usr/bin/env bash
# Renders and lints the paqet-dp Helm chart offline, then validates the manifests.
#
# - installs (idempotent) PyPI helm-python-sdk (Helm v4 SDK as a shared library: no helm binary and no
#   cluster needed) and kubernetes-validate;
# - renders deploy/helm/paqet-dp with default, client and server values into
#   $OUT/<variant>/<template>.yaml (default OUT: target/helm-check);
# - lints the chart for each variant (errors and warnings fail);
# - validates every rendered manifest with `kubernetes-validate --strict` against Kubernetes $KUBE_VERSION
#   (the ServiceMonitor CRD, which it has no schema for, is checked for shape by the renderer only).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/deploy/helm/paqet-dp"
OUT="${HELM_CHECK_OUT:-$ROOT/target/helm-check}"
KUBE_VERSION="${KUBE_VERSION:-1.33.0}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
    echo "helm-check: installing helm-python-sdk and kubernetes-validate from PyPI"
    "$PY" -m pip install --quiet --disable-pip-version-check helm-python-sdk kubernetes-validate
fi

rm -rf "$OUT"
mkdir -p "$OUT"

"$PY" - "$CHART" "$OUT" "$KUBE_VERSION" <<'PYEOF'
import os, sys
import helm_python as helm

chart_dir, out, kube = sys.argv[1], sys.argv[2], sys.argv[3]
chart = helm.Chart.load(chart_dir)
variants = {
    "default": None,
    "client": os.path.join(chart_dir, "values-client.yaml"),
    "server": os.path.join(chart_dir, "values-server.yaml"),
    # Exercises the optional ServiceMonitor template too.
    "monitor": None,
}
failed = False
for name, values_file in variants.items():
    values = None
    if values_file:
        with open(values_file) as f:
            values = helm.values_from_yaml(f.read())
    if name == "monitor":
        values = {"metrics": {"serviceMonitor": {"enabled": True}}}
    report = helm.lint(chart_dir, values, strict=True, kube_version="v" + kube)
    for m in report.get("messages") or []:
        sev = m.get("severity", 0)
        label = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(sev, "UNKNOWN")
        print(f"lint[{name}] {label} {m.get('path')}: {m.get('error')}")
        if sev >= 2:
            failed = True
    for e in report.get("errors") or []:
        print(f"lint[{name}] ERROR {e}")
        failed = True
    rendered = chart.render(values, name="paqet-dp", namespace="paqet-dp", is_install=True)
    vdir = os.path.join(out, name)
    os.makedirs(vdir, exist_ok=True)
    for path, text in sorted(rendered.items()):
        base = os.path.basename(path)
        if not text.strip() or not base.endswith(".yaml"):
            if base == "NOTES.txt":
                with open(os.path.join(vdir, "NOTES.txt"), "w") as f:
                    f.write(text)
            continue
        with open(os.path.join(vdir, base), "w") as f:
            f.write(text)
    print(f"render[{name}]: {', '.join(sorted(os.listdir(vdir)))}")
sys.exit(1 if failed else 0)
PYEOF

# kubernetes-validate knows core/apps kinds; CRDs (ServiceMonitor) have no schema there.
mapfile -t MANIFESTS < <(grep -L '^kind: ServiceMonitor' "$OUT"/*/*.yaml)
kubernetes-validate --strict -k "$KUBE_VERSION" "${MANIFESTS[@]}"
echo "helm-check: ok (rendered, linted and validated against Kubernetes $KUBE_VERSION in $OUT)"
