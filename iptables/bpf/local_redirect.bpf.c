// SPDX-License-Identifier: GPL-2.0
//
// weft's local-redirect acceleration: a TCP connection whose two ends are sockets of this
// host in the same network namespace (the app and its sidecar on loopback, or on the pod's
// own address) skips the TCP/IP stack for its payload. `weft_sockops` records each such
// socket in `weft_socks` when it is established, keyed by its own view of the connection;
// `weft_msg` runs on every send of a recorded socket and hands the bytes straight to the
// receive queue of the socket at the other end, when that one is recorded too. The
// handshake, FIN and RST still travel through the stack, and a send whose peer is not
// recorded goes through it as before. What applications see is the same, except that the
// kernel can end a blocking read of a redirected socket early with EAGAIN (README, "eBPF
// local redirect").
//
// In a network namespace registered in `weft_transparent` (`weft-iptables ebpf
// transparent`), `weft_connect4` also sends the apps' outbound TCP connections to the
// proxy's outbound port on 127.0.0.1 when they connect, instead of leaving that to the
// iptables REDIRECT: the app's socket then names the proxy's, both ends are recorded and the
// hop is redirected like any other local one. The destination the app asked for is kept,
// first by the socket's cookie, then (once established) by the proxy's view of the
// connection, and `weft_getsockopt` answers the proxy's SO_ORIGINAL_DST with it, as conntrack
// does after a REDIRECT; `weft_getpeername4` shows the app that destination as its peer.
// Which connections go to the proxy follows the iptables rules of `weft-iptables install`
// (the same flags): not the proxy's own (by uid), not to a loopback or local address, not to
// an excluded port or network.
//
// Built by iptables/build.rs with `clang -target bpf` and loaded by `weft-iptables ebpf
// install` through bpftool.

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define TCP_CLOSE 7

// The limits of one namespace's transparent configuration; `weft-iptables` refuses more.
#define MAX_EXCLUDED_PORTS 32
#define MAX_EXCLUDED_NETS 32
#define MAX_LOCAL_ADDRS 16

// One end of a connection as that end sees it. The network namespace's cookie keeps
// namespaces that reuse the same addresses (every one has 127.0.0.1) apart.
struct sock_key {
	__u64 netns;
	__u32 local_ip;
	__u32 remote_ip;
	__u32 local_port;
	__u32 remote_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32);
} weft_socks SEC(".maps");

// A network namespace's transparent-proxy settings, written by `weft-iptables ebpf
// transparent` (`iptables/src/ebpf.rs` lays out the same bytes). Addresses and masks are in
// network byte order, ports and the uid in host order.
struct transparent_conf {
	__u32 proxy_uid;
	__u16 outbound_port;
	__u16 excluded_port_count;
	__u16 excluded_net_count;
	__u16 local_addr_count;
	__u16 excluded_ports[MAX_EXCLUDED_PORTS];
	__u32 excluded_nets[MAX_EXCLUDED_NETS][2];
	__u32 local_addrs[MAX_LOCAL_ADDRS];
};

// `TransparentConf::to_bytes` writes these offsets.
_Static_assert(sizeof(struct transparent_conf) == 396, "transparent_conf size");
_Static_assert(__builtin_offsetof(struct transparent_conf, excluded_ports) == 12,
	       "transparent_conf.excluded_ports");
_Static_assert(__builtin_offsetof(struct transparent_conf, excluded_nets) == 76,
	       "transparent_conf.excluded_nets");
_Static_assert(__builtin_offsetof(struct transparent_conf, local_addrs) == 332,
	       "transparent_conf.local_addrs");

// By network namespace cookie. LRU: a namespace that is gone without `--remove` is never
// looked up again, so when the map is full its entry is the one that goes.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct transparent_conf);
} weft_transparent SEC(".maps");

// Where an app asked to connect (network byte order), and the proxy port it was sent to
// instead (host order).
struct orig_dst {
	__u32 ip;
	__u32 port;
	__u32 proxy_port;
};

// App sockets sent to the proxy, by cookie: from `connect` until they close (state
// callback), for `file_orig_dst` and `weft_getpeername4`.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
} weft_app_orig SEC(".maps");

// Established ones waiting for the proxy's SO_ORIGINAL_DST, by the proxy's view of the
// connection (its `sock_key`); taken out when answered or when the app's socket closes.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct orig_dst);
} weft_orig_dst SEC(".maps");

// `remote_port` is in network byte order, in the low 16 bits on current kernels and in
// the high 16 bits on some older ones; `local_port` is in host byte order.
static __always_inline __u32 remote_port_host(__u32 port)
{
	__u16 p = port > 0xffff ? (__u16)(port >> 16) : (__u16)port;
	return bpf_ntohs(p);
}

// 127.0.0.0/8; addresses are in network byte order.
static __always_inline int is_loopback(__u32 ip)
{
	return (bpf_ntohl(ip) >> 24) == 127;
}

// The proxy's view of the connection an app socket is one end of.
static __always_inline struct sock_key proxy_view(struct bpf_sock_ops *skops)
{
	struct sock_key key = {
		.netns = bpf_get_netns_cookie(skops),
		.local_ip = skops->remote_ip4,
		.remote_ip = skops->local_ip4,
		.local_port = remote_port_host(skops->remote_port),
		.remote_port = skops->local_port,
	};
	return key;
}

// An app socket that `weft_connect4` sent to the proxy is established: its original
// destination is filed under the proxy's view of the connection, for `weft_getsockopt`, and
// both records are removed when the app's socket closes. A record whose socket is not
// connected to the proxy port it was sent to (it connected again, elsewhere) is dropped.
static __always_inline void file_orig_dst(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *orig = bpf_map_lookup_elem(&weft_app_orig, &cookie);
	if (!orig)
		return;
	if (skops->remote_ip4 != bpf_htonl(0x7f000001) ||
	    remote_port_host(skops->remote_port) != orig->proxy_port) {
		bpf_map_delete_elem(&weft_app_orig, &cookie);
		return;
	}
	struct sock_key key = proxy_view(skops);
	struct orig_dst value = *orig;
	if (bpf_map_update_elem(&weft_orig_dst, &key, &value, BPF_ANY) == 0)
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
}

SEC("sockops")
int weft_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET)
		return 1;
	if (skops->op == BPF_SOCK_OPS_STATE_CB) {
		// App sockets of `file_orig_dst` ask for state changes (and maybe others' too).
		if (skops->args[1] == TCP_CLOSE) {
			__u64 cookie = bpf_get_socket_cookie(skops);
			if (bpf_map_lookup_elem(&weft_app_orig, &cookie)) {
				struct sock_key key = proxy_view(skops);
				bpf_map_delete_elem(&weft_orig_dst, &key);
				bpf_map_delete_elem(&weft_app_orig, &cookie);
			}
		}
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		file_orig_dst(skops);
	// Both ends on this host: the same address on both sides (127.0.0.1 to 127.0.0.1,
	// or the pod's address to itself), or a loopback address on either side (the inbound
	// sidecar reaches its app from 127.0.0.6). A connection to another host is left alone.
	if (skops->local_ip4 != skops->remote_ip4 && !is_loopback(skops->local_ip4) &&
	    !is_loopback(skops->remote_ip4))
		return 1;
	struct sock_key key = {
		.netns = bpf_get_netns_cookie(skops),
		.local_ip = skops->local_ip4,
		.remote_ip = skops->remote_ip4,
		.local_port = skops->local_port,
		.remote_port = remote_port_host(skops->remote_port),
	};
	bpf_sock_hash_update(skops, &weft_socks, &key, BPF_NOEXIST);
	return 1;
}

SEC("sk_msg")
int weft_msg(struct sk_msg_md *msg)
{
	// The other end's own view: local and remote swapped.
	struct sock_key peer = {
		.netns = bpf_get_netns_cookie(msg),
		.local_ip = msg->remote_ip4,
		.remote_ip = msg->local_ip4,
		.local_port = remote_port_host(msg->remote_port),
		.remote_port = msg->local_port,
	};
	// Without a recorded peer the redirect fails and the bytes take the stack.
	bpf_msg_redirect_hash(msg, &weft_socks, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

// Whether `ip` (network byte order) is in `net`/`mask` (both network byte order).
static __always_inline int in_net(__u32 ip, __u32 net, __u32 mask)
{
	return (ip & mask) == net;
}

// Whether an app's TCP connection to `ip`:`port` (network byte order; the port in host
// order) goes to the proxy under `conf`, as the iptables rules of `weft-iptables install`
// decide it: not to a loopback or local address, an excluded port or an excluded network.
static __always_inline int to_proxy(const struct transparent_conf *conf, __u32 ip, __u16 port)
{
	if (ip == 0 || is_loopback(ip))
		return 0;
	for (int i = 0; i < MAX_LOCAL_ADDRS; i++) {
		if (i >= conf->local_addr_count)
			break;
		if (conf->local_addrs[i] == ip)
			return 0;
	}
	for (int i = 0; i < MAX_EXCLUDED_PORTS; i++) {
		if (i >= conf->excluded_port_count)
			break;
		if (conf->excluded_ports[i] == port)
			return 0;
	}
	for (int i = 0; i < MAX_EXCLUDED_NETS; i++) {
		if (i >= conf->excluded_net_count)
			break;
		if (in_net(ip, conf->excluded_nets[i][0], conf->excluded_nets[i][1]))
			return 0;
	}
	return 1;
}

SEC("cgroup/connect4")
int weft_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	const struct transparent_conf *conf = bpf_map_lookup_elem(&weft_transparent, &netns);
	if (!conf)
		return 1;
	// A socket may connect again after a failed connect: forget where it went before.
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_delete_elem(&weft_app_orig, &cookie);
	// The proxy's own connections are never sent back to it. (The uid is the kernel's, as
	// `weft-iptables` maps it when it registers the namespace.)
	if ((__u32)bpf_get_current_uid_gid() == conf->proxy_uid)
		return 1;
	// A socket bound to a device could not reach 127.0.0.1: left to iptables.
	struct bpf_sock *sk = ctx->sk;
	if (sk && sk->bound_dev_if)
		return 1;
	__u32 ip = ctx->user_ip4;
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	if (!to_proxy(conf, ip, port))
		return 1;
	struct orig_dst orig = {
		.ip = ip,
		.port = ctx->user_port,
		.proxy_port = conf->outbound_port,
	};
	// Without a record the proxy could not tell where the app was going: leave the
	// connection to iptables.
	if (bpf_map_update_elem(&weft_app_orig, &cookie, &orig, BPF_ANY) != 0)
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(conf->outbound_port);
	return 1;
}

SEC("cgroup/getsockopt")
int weft_getsockopt(struct bpf_sockopt *ctx)
{
	// Every getsockopt of the cgroup comes here. A result larger than a page is not
	// copied for the program, and before Linux 6.5 it fails with EFAULT unless the
	// program says it leaves it alone (iptables-legacy's rule dumps are that large).
	if (ctx->optlen > 4096) {
		ctx->optlen = 0;
		return 1;
	}
	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->family != AF_INET)
		return 1;
	struct sock_key key = {
		.netns = bpf_get_netns_cookie(ctx),
		.local_ip = sk->src_ip4,
		.remote_ip = sk->dst_ip4,
		.local_port = sk->src_port,
		.remote_port = remote_port_host(sk->dst_port),
	};
	struct orig_dst *orig = bpf_map_lookup_elem(&weft_orig_dst, &key);
	if (!orig)
		return 1;
	// A `struct sockaddr_in`, as the kernel answers SO_ORIGINAL_DST.
	__u8 *out = ctx->optval;
	if (out + 16 > (__u8 *)ctx->optval_end)
		return 1;
	__u16 family = AF_INET;
	__u16 port = (__u16)orig->port;
	__builtin_memcpy(out, &family, 2);
	__builtin_memcpy(out + 2, &port, 2);
	__builtin_memcpy(out + 4, &orig->ip, 4);
	__builtin_memset(out + 8, 0, 8);
	// The proxy asks once per connection.
	bpf_map_delete_elem(&weft_orig_dst, &key);
	// Two separate 4-byte stores: the verifier refuses the one 8-byte store that clang
	// would merge them into.
	ctx->retval = 0;
	asm volatile("" ::: "memory");
	ctx->optlen = 16;
	return 1;
}

// The app's view: its socket's peer is where it asked to connect, not the proxy's port.
SEC("cgroup/getpeername4")
int weft_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *orig = bpf_map_lookup_elem(&weft_app_orig, &cookie);
	if (!orig)
		return 1;
	ctx->user_ip4 = orig->ip;
	ctx->user_port = orig->port;
	return 1;
}

char _license[] SEC("license") = "GPL";
