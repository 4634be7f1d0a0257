#!/usr/bin/env bash
# weft's local demo mesh: the control plane on the embedded store, two services (web and
# backend) each with a sidecar, mTLS on, and traffic flowing from web to backend.
#
#   ./demo/run.sh            # builds (debug: quick to build) and runs until Ctrl-C, then cleans up
#
# Explicit mode (no iptables, no root needed): web's app calls its sidecar on 127.0.0.1:10001,
# which carries the call over mesh mTLS to backend's sidecar, which hands it to backend's app.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p weft-control -p weft-proxy -p weft-bench
bin=$PWD/target/debug
work=$(mktemp -d /tmp/weft-demo.XXXXXX)
pids=()
cleanup() {
    trap - EXIT INT TERM
    echo
    echo "stopping the demo mesh"
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

api=${WEFT_DEMO_API:-127.0.0.1:5681}
dp=${WEFT_DEMO_DP:-127.0.0.1:5678}
weftctl() { "$bin/weftctl" --api-url "http://$api" "$@"; }

"$bin/weft-control" run --data-dir "$work/cp" --api-address "$api" --dp-server-address "$dp" \
    >"$work/control.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do weftctl get meshes >/dev/null 2>&1 && break; sleep 0.1; done

cat >"$work/mesh.yaml" <<'YAML'
type: Mesh
name: default
mtls:
  enabledBackend: ca-1
  backends:
  - name: ca-1
    type: builtin
---
type: TrafficPermission
mesh: default
name: web-to-backend
sources: [{match: {kuma.io/service: web}}]
destinations: [{match: {kuma.io/service: backend}}]
YAML
weftctl apply -f "$work/mesh.yaml"

cat >"$work/backend.yaml" <<'YAML'
type: Dataplane
mesh: default
name: backend-1
networking:
  address: 127.0.0.1
  inbound:
  - port: 18080
    servicePort: 18081
    tags: {kuma.io/service: backend, kuma.io/protocol: http}
YAML
cat >"$work/web.yaml" <<'YAML'
type: Dataplane
mesh: default
name: web-1
networking:
  address: 127.0.0.1
  inbound:
  - port: 18090
    servicePort: 18091
    tags: {kuma.io/service: web}
  outbound:
  - port: 10001
    tags: {kuma.io/service: backend}
YAML
(umask 077
 weftctl generate dataplane-token --mesh default --name backend-1 >"$work/backend.token" 2>/dev/null
 weftctl generate dataplane-token --mesh default --name web-1 >"$work/web.token" 2>/dev/null)

# backend's app answers HTTP; web's app is the curl loop below.
"$bin/weft-bench" serve --http 127.0.0.1:18081 --body-size 64 >"$work/backend-app.log" 2>&1 &
pids+=($!)

sidecar() { # name admin-port
    "$bin/weft-proxy" run --cp-address "https://$dp" --ca-cert-file "$work/cp/cp-ca.pem" \
        --dataplane-file "$work/$1.yaml" --dataplane-token-file "$work/$1.token" \
        --admin-address "127.0.0.1:$2" --drain-time 2s >"$work/$1-sidecar.log" 2>&1 &
    pids+=($!)
}
sidecar backend 9901
sidecar web 9902
for _ in $(seq 100); do
    curl -sf http://127.0.0.1:9901/ready >/dev/null && curl -sf http://127.0.0.1:9902/ready >/dev/null && break
    sleep 0.1
done

echo
echo "weft demo mesh is up (logs in $work):"
echo "  REST API         http://$api   (try: target/debug/weftctl --api-url http://$api get dataplanes)"
echo "  dataplanes       http://$api/meshes/default/dataplanes+insights"
echo "  backend sidecar  admin http://127.0.0.1:9901  (/ready /config /certs /metrics)"
echo "  web sidecar      admin http://127.0.0.1:9902"
echo "  web -> backend   http://127.0.0.1:10001/   (web's outbound; mTLS between the sidecars)"
echo
echo "Calling backend from web once a second; Ctrl-C stops everything."
while true; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:10001/ || true)
    echo "$(date +%T) web -> backend: HTTP $code"
    sleep 1
done
