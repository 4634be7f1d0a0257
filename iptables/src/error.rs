//! The errors the library reports.

use std::path::PathBuf;

/// Everything that can go wrong while planning, installing, removing or
/// showing weft's rules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent; nothing was changed.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// No usable iptables binary was found on this host.
    #[error(
        "no iptables binary found ({looked_for}); install the Debian package `iptables` \
         (apt-get install -y iptables)"
    )]
    NoIptables {
        /// The binaries that were looked for, comma separated.
        looked_for: String,
    },

    /// The binaries exist but none of them could list the nat table.
    #[error("no iptables backend works on this host: {0}")]
    NoWorkingBackend(String),

    /// The `ip` binary (iproute2) is needed but missing.
    #[error("`ip` not found; install the Debian package `iproute2` (apt-get install -y iproute2)")]
    NoIproute2,

    /// Existing `WEFT_` chains hold rules we did not write; refusing to touch them.
    #[error("refusing to change chain {chain}: it holds rules without the weft comment: {rule}")]
    ForeignRuleInOurChain {
        /// The `WEFT_` chain.
        chain: String,
        /// The offending rule as `iptables-save` printed it.
        rule: String,
    },

    /// `bpftool` is needed (`weft-iptables ebpf`) but missing.
    #[error(
        "`bpftool` not found; install the Debian package `bpftool` (apt-get install -y bpftool)"
    )]
    NoBpftool,

    /// `weft-iptables ebpf install` in a build that has no eBPF programs.
    #[error(
        "this weft-iptables was built without the eBPF programs (no clang at build time: \
         apt-get install clang libbpf-dev, then rebuild)"
    )]
    NoEbpfPrograms,

    /// Removing an eBPF install left something behind (each failure named).
    #[error("uninstalling the eBPF programs: {0}")]
    EbpfUninstall(String),

    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// Starting a helper binary failed.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// The binary that could not be started.
        program: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A helper binary ran but failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        /// The binary that failed.
        program: PathBuf,
        /// Its exit status, as text.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_iptables_names_the_debian_package() {
        let e = Error::NoIptables {
            looked_for: "looked for iptables-nft-save".into(),
        };
        assert!(e.to_string().contains("Debian package `iptables`"), "{e}");
    }
}
