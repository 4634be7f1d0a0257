# Helpers of demo/run.sh (sourced, not run): processes, waiting, and the network namespaces of
# transparent mode.

# Processes the demo started; cleanup stops them.
pids=()

# start LOG CMD...: runs CMD in the background, its output in $work/LOG.log.
start() {
    local log=$1; shift
    "$@" >"$work/$log.log" 2>&1 &
    pids+=($!)
}

# wait_for WHAT LOG CMD...: polls CMD (20 s at most) until it succeeds. Fails, with the end of
# $work/LOG.log, if the last process started has exited or time is up.
wait_for() {
    local what=$1 log=$2 pid=${pids[-1]}; shift 2
    for _ in $(seq 200); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "$what did not come up; the end of $log.log:" >&2
    tail -n 8 "$work/$log.log" >&2 || true
    return 1
}

# stop_processes: SIGTERM to every process started, SIGKILL to any still there after 5 s.
stop_processes() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# --- transparent mode: two namespaces ---------------------------------------------------------
#
#            host (control plane, REST API on 127.0.0.1)
#        wdemo-web 10.213.1.1      wdemo-backend 10.213.2.1
#               |  veth                    |  veth
#     host0 10.213.1.2                host0 10.213.2.2
#   weft-demo-web                        weft-demo-backend
#     mesh0 10.213.3.1 ------ veth ------ mesh0 10.213.3.2
#
# Web and backend talk over their own veth pair, so the host forwards nothing (its forwarding
# setting and FORWARD chain are left alone). The control plane's dataplane server listens on
# 10.213.1.1; backend reaches it through its veth to the host (local delivery, no forwarding).
# WEFT_DEMO_NET changes the first two octets (default 10.213) if that range is taken here.

net=${WEFT_DEMO_NET:-10.213}
ns_web=weft-demo-web
ns_backend=weft-demo-backend
web_ip=$net.3.1
backend_ip=$net.3.2
cp_ip=$net.1.1

# netns_down: kills whatever runs in the demo's namespaces and deletes them (with their rules
# and veths). Safe when nothing is there, so it also clears what a crashed run left.
netns_down() {
    local ns link pid data
    # A control plane of a crashed run: the one process listening on the demo's own address.
    # Its --data-dir names that run's scratch directory, which goes too.
    for pid in $(ss -Hltnp "src $cp_ip" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        data=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -x -A1 -- --data-dir | tail -n 1 || true)
        kill -KILL "$pid" 2>/dev/null || true
        case $data in /tmp/weft-demo.*/cp) rm -rf "${data%/cp}" ;; esac
    done
    for ns in "$ns_web" "$ns_backend"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    for link in wdemo-web wdemo-backend; do
        ip link del "$link" 2>/dev/null || true
    done
}

# net_is_free: fails, saying why, if an address or route of this host is in the demo's range.
net_is_free() {
    local a taken
    taken=$(ip -o -4 addr show to "$net.0.0/16")
    for a in "$cp_ip" "$net.2.1" "$web_ip"; do
        taken+=$(ip -4 route show match "$a" | grep -v '^default' || true)
    done
    if [ -n "$taken" ]; then
        echo "$net.0.0/16 is in use on this host:" >&2
        echo "$taken" >&2
        echo "pick another range with WEFT_DEMO_NET (e.g. WEFT_DEMO_NET=10.214)" >&2
        return 1
    fi
}

# host_link NS HOST-IFACE K: a veth pair between the host (HOST-IFACE, $net.K.1/30) and NS
# (host0, $net.K.2/30); NS reaches the rest of the demo's range through the host.
host_link() {
    local ns=$1 ifc=$2 k=$3
    ip link add "$ifc" type veth peer name host0 netns "$ns"
    ip addr add "$net.$k.1/30" dev "$ifc"
    ip link set "$ifc" up
    ip -n "$ns" addr add "$net.$k.2/30" dev host0
    ip -n "$ns" link set host0 up
    ip -n "$ns" route add "$net.0.0/16" via "$net.$k.1"
}

# netns_up: the two namespaces, joined to the host and to each other.
netns_up() {
    local ns
    for ns in "$ns_web" "$ns_backend"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    host_link "$ns_web" wdemo-web 1
    host_link "$ns_backend" wdemo-backend 2
    ip -n "$ns_web" link add mesh0 type veth peer name mesh0 netns "$ns_backend"
    ip -n "$ns_web" addr add "$web_ip/30" dev mesh0
    ip -n "$ns_backend" addr add "$backend_ip/30" dev mesh0
    ip -n "$ns_web" link set mesh0 up
    ip -n "$ns_backend" link set mesh0 up
}
