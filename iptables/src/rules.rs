//! The rules install writes, following Kuma's shape (`kuma.md` §5).
//!
//! Everything lives in the `nat` table. `PREROUTING` jumps to
//! [`INBOUND`], `OUTPUT` to
//! [`OUTBOUND`]; the two `*_REDIRECT` chains hold the
//! `REDIRECT` targets. With `--redirect-dns`, three rules in `OUTPUT` (before
//! the jump) send UDP port 53 to the DNS port, except the proxy's own queries,
//! and keep the application's TCP DNS away from the outbound listener.

use crate::config::{
    COMMENT, Config, Family, INBOUND, INBOUND_REDIRECT, OUTBOUND, OUTBOUND_REDIRECT,
};

/// One rule: the chain it is appended to and its match/target words
/// (without the comment, which [`Rule::to_append`] adds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Chain the rule is appended to.
    pub chain: &'static str,
    /// Matches and target, e.g. `-p tcp -j WEFT_INBOUND`.
    pub spec: String,
}

impl Rule {
    fn new(chain: &'static str, spec: impl Into<String>) -> Self {
        Rule {
            chain,
            spec: spec.into(),
        }
    }

    /// The `iptables-restore` line appending this rule, with weft's comment
    /// placed just before the target.
    pub fn to_append(&self) -> String {
        let comment = format!("-m comment --comment {COMMENT}");
        match self.spec.find("-j ") {
            Some(0) => format!("-A {} {comment} {}", self.chain, self.spec),
            Some(i) => format!(
                "-A {} {} {comment} {}",
                self.chain,
                self.spec[..i].trim_end(),
                &self.spec[i..]
            ),
            None => format!("-A {} {} {comment}", self.chain, self.spec),
        }
    }
}

/// The rules install writes for `family`, in order.
pub fn rules(cfg: &Config, family: Family) -> Vec<Rule> {
    let uid = cfg.proxy_uid;
    let lo = family.loopback();
    let mut out = vec![Rule::new("PREROUTING", format!("-p tcp -j {INBOUND}"))];

    if cfg.redirect_dns {
        out.push(Rule::new(
            "OUTPUT",
            format!("-p udp --dport 53 -m owner --uid-owner {uid} -j RETURN"),
        ));
        out.push(Rule::new(
            "OUTPUT",
            format!(
                "-p udp --dport 53 -j REDIRECT --to-ports {}",
                cfg.redirect_dns_port
            ),
        ));
        out.push(Rule::new(
            "OUTPUT",
            format!("-p tcp --dport 53 -m owner ! --uid-owner {uid} -j RETURN"),
        ));
    }
    out.push(Rule::new("OUTPUT", format!("-p tcp -j {OUTBOUND}")));

    for port in &cfg.exclude_inbound_ports {
        out.push(Rule::new(
            INBOUND,
            format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    out.push(Rule::new(INBOUND, format!("-p tcp -j {INBOUND_REDIRECT}")));
    out.push(Rule::new(
        INBOUND_REDIRECT,
        format!(
            "-p tcp -j REDIRECT --to-ports {}",
            cfg.redirect_inbound_port
        ),
    ));

    // The loop guard: the proxy's inbound forwarding leaves from the guard
    // address over loopback and must reach the application untouched.
    out.push(Rule::new(
        OUTBOUND,
        format!("-s {} -o lo -j RETURN", family.loop_guard()),
    ));
    // The proxy talking to its own pod address goes through inbound.
    out.push(Rule::new(
        OUTBOUND,
        format!("! -d {lo} -o lo -p tcp -m owner --uid-owner {uid} -j {INBOUND_REDIRECT}"),
    ));
    // Applications talking over loopback stay local.
    out.push(Rule::new(
        OUTBOUND,
        format!("-o lo -p tcp -m owner ! --uid-owner {uid} -j RETURN"),
    ));
    // The proxy's own traffic is never redirected.
    out.push(Rule::new(
        OUTBOUND,
        format!("-m owner --uid-owner {uid} -j RETURN"),
    ));
    out.push(Rule::new(OUTBOUND, format!("-d {lo} -j RETURN")));
    for port in &cfg.exclude_outbound_ports {
        out.push(Rule::new(
            OUTBOUND,
            format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    for net in cfg
        .exclude_outbound_ips
        .iter()
        .filter(|n| family.contains(n))
    {
        out.push(Rule::new(OUTBOUND, format!("-d {} -j RETURN", net.trunc())));
    }
    out.push(Rule::new(OUTBOUND, format!("-j {OUTBOUND_REDIRECT}")));
    out.push(Rule::new(
        OUTBOUND_REDIRECT,
        format!(
            "-p tcp -j REDIRECT --to-ports {}",
            cfg.redirect_outbound_port
        ),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_goes_before_the_target() {
        let r = Rule::new("X", "-p tcp -j RETURN");
        assert_eq!(
            r.to_append(),
            "-A X -p tcp -m comment --comment weft/transparent-proxy -j RETURN"
        );
        let r = Rule::new("X", "-j RETURN");
        assert_eq!(
            r.to_append(),
            "-A X -m comment --comment weft/transparent-proxy -j RETURN"
        );
    }

    #[test]
    fn v6_uses_v6_addresses() {
        let text: Vec<String> = rules(&Config::default(), Family::V6)
            .iter()
            .map(Rule::to_append)
            .collect();
        assert!(text.iter().any(|l| l.contains("-s ::6/128 -o lo")));
        assert!(text.iter().any(|l| l.contains("-d ::1/128")));
        assert!(!text.iter().any(|l| l.contains("127.0.0")));
    }
}
