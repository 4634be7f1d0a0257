#!/usr/bin/env bash
# weft's local demo mesh: the control plane on the embedded store, two services (web and
# backend) each with a sidecar, mTLS on, and traffic flowing from web to backend.
#
#   ./demo/run.sh            # builds (debug: quick to build) and runs until Ctrl-C, then cleans up
#
# As root, transparent mode: web and backend each get a network namespace (weft-demo-web,
# weft-demo-backend) with weft-iptables rules inside it, so the host's own traffic is never
# intercepted. Web's app calls backend's address (10.213.3.2:8080); the rules hand the call to
# web's sidecar, which carries it over mesh mTLS to backend's sidecar, whose rules caught it on
# arrival, which hands it to backend's app. The control plane stays in the host's namespace.
#
# Without root, explicit mode (no namespaces, no iptables): web's app calls its sidecar on
# 127.0.0.1:10001, which carries the call over mesh mTLS to backend's sidecar, which hands it to
# backend's app.
#
# WEFT_DEMO_MODE=explicit|transparent forces a mode (transparent needs root). WEFT_DEMO_API sets
# the REST API's address (127.0.0.1:5681), WEFT_DEMO_DP the dataplane server's in explicit mode
# (127.0.0.1:5678), WEFT_DEMO_NET the first two octets of transparent mode's addresses (10.213).
# The binaries are built into $CARGO_TARGET_DIR if set, else target/; WEFT_DEMO_BIN_DIR uses
# binaries built already instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. demo/lib.sh

if ! command -v curl >/dev/null; then
    echo "the demo's apps call each other with curl: apt-get install -y curl" >&2
    exit 1
fi
# What transparent mode runs besides weft: ip (iproute2), iptables-restore (iptables), setpriv.
transparent_tools_missing() {
    local t
    for t in ip iptables-restore setpriv; do
        command -v "$t" >/dev/null || { echo "$t"; return 0; }
    done
    return 1
}
mode=${WEFT_DEMO_MODE:-}
if [ -z "$mode" ]; then
    mode=explicit
    if [ "$(id -u)" = 0 ]; then
        if missing=$(transparent_tools_missing); then
            echo "no $missing here, so explicit mode (apt-get install -y iptables iproute2 for transparent)" >&2
        else
            mode=transparent
        fi
    fi
fi
case $mode in
    explicit) ;;
    transparent)
        if [ "$(id -u)" != 0 ]; then
            echo "WEFT_DEMO_MODE=transparent needs root (network namespaces, iptables)" >&2
            exit 1
        fi
        if missing=$(transparent_tools_missing); then
            echo "WEFT_DEMO_MODE=transparent needs $missing (apt-get install -y iptables iproute2)" >&2
            exit 1
        fi ;;
    *) echo "WEFT_DEMO_MODE is explicit or transparent, not '$mode'" >&2; exit 1 ;;
esac

# One package set for both modes: another set would unify dependency features differently and
# rebuild them at each switch.
if [ -n "${WEFT_DEMO_BIN_DIR:-}" ]; then
    # Already built (the end-to-end test runs the demo this way: a nested cargo would wait
    # for the outer one's lock on the target directory).
    bin=$(cd "$WEFT_DEMO_BIN_DIR" && pwd)
else
    cargo build -q -p weft-control -p weft-proxy -p weft-bench -p weft-iptables
    bin=$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)
fi

work=$(mktemp -d /tmp/weft-demo.XXXXXX)
cleanup() {
    trap '' INT TERM
    trap - EXIT
    echo
    echo "stopping the demo mesh"
    stop_processes
    if [ "$mode" = transparent ]; then netns_down; fi
    rm -rf "$work"
}
# Also on a failure midway (set -e exits, and EXIT runs cleanup).
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

api=${WEFT_DEMO_API:-127.0.0.1:5681}
if [ "$mode" = transparent ]; then
    netns_down # whatever a crashed run left
    net_is_free
    netns_up
    dp=$cp_ip:5678
else
    dp=${WEFT_DEMO_DP:-127.0.0.1:5678}
fi
weftctl() { "$bin/weftctl" --api-url "http://$api" "$@"; }

start control "$bin/weft-control" run --data-dir "$work/cp" --api-address "$api" \
    --dp-server-address "$dp"
wait_for "the control plane" control weftctl get meshes

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

# token NAME FILE: a dataplane token for NAME, readable by its owner only.
token() {
    (umask 077; weftctl generate dataplane-token --mesh default --name "$1" >"$2" 2>/dev/null)
}

explicit_up() {
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
    token backend-1 "$work/backend.token"
    token web-1 "$work/web.token"

    # backend's app answers HTTP; web's app is the curl loop at the end.
    start backend-app "$bin/weft-bench" serve --http 127.0.0.1:18081 --body-size 64
    local name admin
    for name in backend web; do
        if [ "$name" = backend ]; then admin=9901; else admin=9902; fi
        start "$name-sidecar" "$bin/weft-proxy" run --cp-address "https://$dp" \
            --ca-cert-file "$work/cp/cp-ca.pem" --dataplane-file "$work/$name.yaml" \
            --dataplane-token-file "$work/$name.token" --admin-address "127.0.0.1:$admin" \
            --drain-time 2s
        wait_for "$name's sidecar" "$name-sidecar" curl -sf "http://127.0.0.1:$admin/ready"
    done

    echo
    echo "weft demo mesh is up, explicit mode (logs in $work):"
    echo "  REST API         http://$api   (try: $bin/weftctl --api-url http://$api get dataplanes)"
    echo "  dataplanes       http://$api/meshes/default/dataplanes+insights"
    echo "  backend sidecar  admin http://127.0.0.1:9901  (/ready /config /certs /metrics)"
    echo "  web sidecar      admin http://127.0.0.1:9902"
    echo "  web -> backend   http://127.0.0.1:10001/   (web's outbound; mTLS between the sidecars)"
}
call_explicit() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:10001/
}

# The uid the transparent sidecars run as: the rules exempt it from redirection (SPEC §1).
proxy_uid=5678

transparent_up() {
    # The sidecars run as $proxy_uid: they may pass through $work into their own directory,
    # and need a weft-proxy they can execute (the build tree may be private to root).
    chmod 0711 "$work"
    local proxy=$bin/weft-proxy
    local as_proxy=(setpriv "--reuid=$proxy_uid" "--regid=$proxy_uid" --clear-groups)
    if ! "${as_proxy[@]}" test -x "$proxy"; then
        mkdir -m 0755 "$work/bin"
        cp "$proxy" "$work/bin/"
        proxy=$work/bin/weft-proxy
    fi

    # backend's app answers HTTP on its namespace's loopback only: callers reach it through
    # its sidecar. web's app is the curl loop at the end.
    start backend-app ip netns exec "$ns_backend" "$bin/weft-bench" serve \
        --http 127.0.0.1:8080 --body-size 64
    local name ns ip tags
    for name in backend web; do
        if [ "$name" = backend ]; then
            ns=$ns_backend ip=$backend_ip tags="{kuma.io/service: backend, kuma.io/protocol: http}"
        else
            ns=$ns_web ip=$web_ip tags="{kuma.io/service: web}"
        fi
        mkdir "$work/$name"
        cat >"$work/$name/dataplane.yaml" <<YAML
type: Dataplane
mesh: default
name: $name-1
networking:
  address: $ip
  inbound:
  - port: 8080
    servicePort: 8080
    tags: $tags
  transparentProxying:
    redirectPortInbound: 15006
    redirectPortOutbound: 15001
YAML
        token "$name-1" "$work/$name/token"
        cp "$work/cp/cp-ca.pem" "$work/$name/cp-ca.pem"
        chown -R "$proxy_uid:$proxy_uid" "$work/$name"
        chmod 0700 "$work/$name"

        if ! ip netns exec "$ns" "$bin/weft-iptables" install --proxy-uid "$proxy_uid" \
            --redirect-inbound-port 15006 --redirect-outbound-port 15001 \
            >"$work/$name-iptables.log" 2>&1; then
            echo "weft-iptables install failed in $ns:" >&2
            cat "$work/$name-iptables.log" >&2
            return 1
        fi
        start "$name-sidecar" ip netns exec "$ns" "${as_proxy[@]}" "$proxy" run \
            --cp-address "https://$dp" --ca-cert-file "$work/$name/cp-ca.pem" \
            --dataplane-file "$work/$name/dataplane.yaml" \
            --dataplane-token-file "$work/$name/token" \
            --admin-address 127.0.0.1:9901 --drain-time 2s
        wait_for "$name's sidecar" "$name-sidecar" \
            ip netns exec "$ns" curl -sf http://127.0.0.1:9901/ready
    done

    local in_web="ip netns exec $ns_web" in_backend="ip netns exec $ns_backend"
    echo
    echo "weft demo mesh is up, transparent mode (logs in $work):"
    echo "  REST API         http://$api   (try: $bin/weftctl --api-url http://$api get dataplanes)"
    echo "  dataplanes       http://$api/meshes/default/dataplanes+insights"
    echo "  namespaces       $ns_web ($web_ip), $ns_backend ($backend_ip);"
    echo "                   control plane's dataplane server https://$dp on the host"
    echo "  backend sidecar  admin on 127.0.0.1:9901 in its namespace (/ready /config /certs /metrics):"
    echo "                   $in_backend curl -s http://127.0.0.1:9901/metrics"
    echo "  web sidecar      $in_web curl -s http://127.0.0.1:9901/metrics"
    echo "  iptables rules   $in_web $bin/weft-iptables show   (or: $in_web iptables-save)"
    echo "  web -> backend   $in_web curl http://$backend_ip:8080/"
    echo "                   (backend's own address: web's sidecar intercepts it, mTLS between the sidecars)"
}
call_transparent() {
    ip netns exec "$ns_web" curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
        "http://$backend_ip:8080/"
}

"${mode}_up"
echo
echo "Calling backend from web once a second; Ctrl-C stops everything."
while true; do
    code=$("call_$mode" || true)
    echo "$(date +%T) web -> backend: HTTP $code"
    sleep 1
done
