//! What to install: ports, the proxy's uid, exclusions, and the IP families.

use std::fmt;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// Prefix of every chain weft owns.
pub const CHAIN_PREFIX: &str = "WEFT_";
/// The comment every rule weft writes carries (`-m comment --comment …`).
pub const COMMENT: &str = "weft/transparent-proxy";
/// Inbound entry chain, jumped to from `PREROUTING`.
pub const INBOUND: &str = "WEFT_INBOUND";
/// Inbound redirect chain: `REDIRECT --to-ports <inbound port>`.
pub const INBOUND_REDIRECT: &str = "WEFT_INBOUND_REDIRECT";
/// Outbound entry chain, jumped to from `OUTPUT`.
pub const OUTBOUND: &str = "WEFT_OUTBOUND";
/// Outbound redirect chain: `REDIRECT --to-ports <outbound port>`.
pub const OUTBOUND_REDIRECT: &str = "WEFT_OUTBOUND_REDIRECT";
/// The chains install creates, in the order they are declared.
pub const CHAINS: [&str; 4] = [INBOUND, INBOUND_REDIRECT, OUTBOUND, OUTBOUND_REDIRECT];

/// Default port of the proxy's outbound listener.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default port of the proxy's inbound listener.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default port of the proxy's DNS listener.
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Default uid the proxy runs as (Kuma's `kuma-dp` uid).
pub const DEFAULT_PROXY_UID: u32 = 5678;

/// An IP family: which of `iptables` / `ip6tables` a ruleset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, `iptables*`.
    V4,
    /// IPv6, `ip6tables*`.
    V6,
}

impl Family {
    /// The loopback address as a host CIDR (`127.0.0.1/32`, `::1/128`).
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The loop-guard source (`127.0.0.6/32`, `::6/128`): the proxy binds
    /// its inbound forwarding connections to it so they are never redirected.
    pub fn loop_guard(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    /// The binary stem: `iptables` or `ip6tables`.
    pub fn stem(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// Whether `net` belongs to this family.
    pub fn contains(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The transparent-proxy configuration: everything install needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Port the proxy's outbound listener accepts redirected connections on.
    pub redirect_outbound_port: u16,
    /// Port the proxy's inbound listener accepts redirected connections on.
    pub redirect_inbound_port: u16,
    /// Uid the proxy runs as; its own traffic is never redirected.
    pub proxy_uid: u32,
    /// Inbound TCP destination ports that bypass the proxy.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound TCP destination ports that bypass the proxy.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks that bypass the proxy.
    pub exclude_outbound_ips: Vec<IpNet>,
    /// Redirect UDP port 53 to [`Config::redirect_dns_port`].
    pub redirect_dns: bool,
    /// Port of the proxy's DNS listener.
    pub redirect_dns_port: u16,
    /// Also install the rules for IPv6 with `ip6tables`.
    pub ipv6: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redirect_outbound_port: DEFAULT_OUTBOUND_PORT,
            redirect_inbound_port: DEFAULT_INBOUND_PORT,
            proxy_uid: DEFAULT_PROXY_UID,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_ips: Vec::new(),
            redirect_dns: false,
            redirect_dns_port: DEFAULT_DNS_PORT,
            ipv6: false,
        }
    }
}

impl Config {
    /// Checks the configuration, returning [`Error::InvalidConfig`] when it
    /// cannot be installed as asked.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::InvalidConfig(msg));
        let mut ports = vec![
            ("--redirect-outbound-port", self.redirect_outbound_port),
            ("--redirect-inbound-port", self.redirect_inbound_port),
        ];
        if self.redirect_dns {
            ports.push(("--redirect-dns-port", self.redirect_dns_port));
        }
        for (flag, port) in &ports {
            if *port == 0 {
                return invalid(format!("{flag} must not be 0"));
            }
        }
        for (i, (flag_a, a)) in ports.iter().enumerate() {
            for (flag_b, b) in &ports[i + 1..] {
                if a == b {
                    return invalid(format!("{flag_a} and {flag_b} are both {a}"));
                }
            }
        }
        for (flag, list) in [
            ("--exclude-inbound-ports", &self.exclude_inbound_ports),
            ("--exclude-outbound-ports", &self.exclude_outbound_ports),
        ] {
            if list.contains(&0) {
                return invalid(format!("{flag} must not contain port 0"));
            }
        }
        let v6 = self
            .exclude_outbound_ips
            .iter()
            .find(|n| Family::V6.contains(n));
        if let (false, Some(net)) = (self.ipv6, v6) {
            return invalid(format!(
                "--exclude-outbound-ips contains the IPv6 network {net}, but --ipv6 is not set"
            ));
        }
        Ok(())
    }

    /// The families to install for: IPv4, plus IPv6 when [`Config::ipv6`].
    pub fn families(&self) -> Vec<Family> {
        families(self.ipv6)
    }
}

/// The families for an `--ipv6` setting: IPv4 always, IPv6 when asked.
pub fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}
