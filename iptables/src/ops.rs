//! The three operations, end to end: detect the backend, read the current
//! state, plan, and apply.

use crate::backend::{Backend, Mode, ModeChoice, ensure_v6_loop_guard};
use crate::config::{Config, Family, families};
use crate::error::Result;
use crate::plan;
use crate::ruleset::Ruleset;

/// What an operation did (or, in a dry run, would do) for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The family.
    pub family: Family,
    /// The backend used; `None` in a dry run that could not detect one.
    pub mode: Option<Mode>,
    /// The `iptables-restore` input applied (or to apply); `None` when
    /// there was nothing to do.
    pub input: Option<String>,
    /// Anything worth telling the operator (e.g. why a dry run assumed an
    /// empty table).
    pub note: Option<String>,
}

/// Installs the rules for `cfg`, replacing any earlier weft rules in the
/// same transaction. With `dry_run`, only plans; when the backend cannot be
/// read in a dry run (no root, no binary), plans against an empty table.
pub fn install(cfg: &Config, choice: ModeChoice, dry_run: bool) -> Result<Vec<Change>> {
    cfg.validate()?;
    let mut changes = Vec::new();
    let mut mode_choice = choice;
    for family in cfg.families() {
        let (backend, current, note) = match current_state(family, mode_choice) {
            Ok((b, r)) => (Some(b), r, None),
            Err(e) if dry_run => (
                None,
                Ruleset::empty(),
                Some(format!("assuming no rules: {e}")),
            ),
            Err(e) => return Err(e),
        };
        // IPv6 uses the mode IPv4 chose.
        if let Some(b) = &backend {
            mode_choice = forced(b.mode);
        }
        let input = plan::install(cfg, family, &current)?;
        if !dry_run {
            let backend = backend.as_ref().expect("not a dry run");
            if family == Family::V6 {
                ensure_v6_loop_guard()?;
            }
            backend.restore(&input)?;
        }
        changes.push(Change {
            family,
            mode: backend.map(|b| b.mode),
            input: Some(input),
            note,
        });
    }
    Ok(changes)
}

/// Removes every weft chain and rule, and nothing else. With `dry_run`,
/// only plans.
pub fn uninstall(ipv6: bool, choice: ModeChoice, dry_run: bool) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    let mut mode_choice = choice;
    for family in families(ipv6) {
        let (backend, current) = current_state(family, mode_choice)?;
        mode_choice = forced(backend.mode);
        let input = plan::uninstall(family, &current)?;
        if let (Some(input), false) = (&input, dry_run) {
            backend.restore(input)?;
        }
        changes.push(Change {
            family,
            mode: Some(backend.mode),
            input,
            note: None,
        });
    }
    Ok(changes)
}

/// What is installed, per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The family.
    pub family: Family,
    /// The backend that was read.
    pub mode: Mode,
    /// Weft's chains and rules in `iptables-save` form; empty when nothing
    /// is installed.
    pub rules: String,
}

/// Reads weft's installed chains and rules.
pub fn show(ipv6: bool, choice: ModeChoice) -> Result<Vec<Installed>> {
    let mut out = Vec::new();
    let mut mode_choice = choice;
    for family in families(ipv6) {
        let (backend, current) = current_state(family, mode_choice)?;
        mode_choice = forced(backend.mode);
        out.push(Installed {
            family,
            mode: backend.mode,
            rules: current.ours_as_text(),
        });
    }
    Ok(out)
}

fn current_state(family: Family, choice: ModeChoice) -> Result<(Backend, Ruleset)> {
    let backend = Backend::detect(family, choice)?;
    let current = Ruleset::parse_nat(&backend.save_nat()?);
    Ok((backend, current))
}

fn forced(mode: Mode) -> ModeChoice {
    match mode {
        Mode::Nft => ModeChoice::Nft,
        Mode::Legacy => ModeChoice::Legacy,
    }
}
