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
// Built by iptables/build.rs with `clang -target bpf` and loaded by `weft-iptables ebpf
// install` through bpftool.

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2

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

SEC("sockops")
int weft_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET)
		return 1;
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
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

char _license[] SEC("license") = "GPL";
