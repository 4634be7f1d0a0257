//! Turning "what should be installed" and "what is installed" into one
//! `iptables-restore --noflush` input, so every change is a single atomic
//! transaction.
//!
//! Install removes any earlier weft rules and writes the new ones in the
//! same transaction, which makes it idempotent: declaring a chain that
//! exists flushes it, weft's rules in built-in chains are deleted by their
//! exact `iptables-save` text, and stale `WEFT_` chains are flushed and
//! deleted. Uninstall does only the removal half.

use crate::config::{CHAINS, Config, Family};
use crate::error::{Error, Result};
use crate::rules::{Rule, rules};
use crate::ruleset::Ruleset;

/// Refuses to touch a `WEFT_` chain that holds a rule without weft's
/// comment: someone else put it there, and removing it would break the
/// promise to leave foreign rules alone.
fn check_ownership(current: &Ruleset) -> Result<()> {
    for rule in &current.rules {
        if crate::ruleset::is_our_chain(&rule.chain) && !rule.has_comment() {
            return Err(Error::ForeignRuleInOurChain {
                chain: rule.chain.clone(),
                rule: rule.line(),
            });
        }
    }
    Ok(())
}

/// The `-D` lines removing weft's rules from chains weft does not own.
fn delete_foreign_chain_rules(current: &Ruleset, out: &mut Vec<String>) {
    for rule in current.our_rules_in_foreign_chains() {
        out.push(format!("-D {} {}", rule.chain, rule.spec));
    }
}

/// The restore input installing `cfg` for `family` over `current` (the
/// host's `nat` table as it is now; [`Ruleset::empty`] for a fresh host).
pub fn install(cfg: &Config, family: Family, current: &Ruleset) -> Result<String> {
    cfg.validate()?;
    check_ownership(current)?;
    let mut lines = vec![
        format!("# weft/transparent-proxy install ({family})"),
        "*nat".into(),
    ];
    // Declaring a chain creates it, or flushes it when it exists.
    for chain in CHAINS {
        lines.push(format!(":{chain} - [0:0]"));
    }
    delete_foreign_chain_rules(current, &mut lines);
    let stale: Vec<&str> = current
        .our_chains()
        .into_iter()
        .filter(|c| !CHAINS.contains(c))
        .collect();
    for chain in &stale {
        lines.push(format!("-F {chain}"));
    }
    for chain in &stale {
        lines.push(format!("-X {chain}"));
    }
    lines.extend(rules(cfg, family).iter().map(Rule::to_append));
    lines.push("COMMIT".into());
    Ok(join(lines))
}

/// The restore input removing every weft chain and rule from `current`, or
/// `None` when nothing of weft's is installed.
pub fn uninstall(family: Family, current: &Ruleset) -> Result<Option<String>> {
    if !current.has_ours() {
        return Ok(None);
    }
    check_ownership(current)?;
    let mut lines = vec![
        format!("# weft/transparent-proxy uninstall ({family})"),
        "*nat".into(),
    ];
    delete_foreign_chain_rules(current, &mut lines);
    let ours = current.our_chains();
    for chain in &ours {
        lines.push(format!("-F {chain}"));
    }
    for chain in &ours {
        lines.push(format!("-X {chain}"));
    }
    lines.push("COMMIT".into());
    Ok(Some(join(lines)))
}

fn join(lines: Vec<String>) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninstall_of_nothing_is_nothing() {
        assert_eq!(uninstall(Family::V4, &Ruleset::empty()).unwrap(), None);
    }

    #[test]
    fn refuses_foreign_rule_in_our_chain() {
        let current = Ruleset::parse_nat(
            "*nat\n:WEFT_OUTBOUND - [0:0]\n-A WEFT_OUTBOUND -j RETURN\nCOMMIT\n",
        );
        assert!(matches!(
            install(&Config::default(), Family::V4, &current),
            Err(Error::ForeignRuleInOurChain { .. })
        ));
        assert!(uninstall(Family::V4, &current).is_err());
    }

    #[test]
    fn stale_chains_are_removed() {
        let current = Ruleset::parse_nat(
            "*nat\n:OUTPUT ACCEPT [0:0]\n:WEFT_OLD - [0:0]\n\
             -A OUTPUT -p udp -m comment --comment \"weft/transparent-proxy\" -j WEFT_OLD\nCOMMIT\n",
        );
        let text = install(&Config::default(), Family::V4, &current).unwrap();
        assert!(text.contains(
            "-D OUTPUT -p udp -m comment --comment \"weft/transparent-proxy\" -j WEFT_OLD\n"
        ));
        assert!(text.contains("-F WEFT_OLD\n-X WEFT_OLD\n"));
    }
}
