//! weft's transparent-proxy installer: the iptables rules that send an
//! application's TCP traffic through the sidecar (SPEC §6).
//!
//! The rules follow Kuma's shape: `PREROUTING` → `WEFT_INBOUND` →
//! `WEFT_INBOUND_REDIRECT` (port 15006), `OUTPUT` → `WEFT_OUTBOUND` →
//! `WEFT_OUTBOUND_REDIRECT` (port 15001); the proxy's uid and loopback are
//! exempt, and connections from the loop-guard address `127.0.0.6` (`::6`)
//! are never redirected. Every change is one `iptables-restore --noflush`
//! transaction, so nothing is ever half applied.
//!
//! Modules, in the order a change flows through them:
//! - [`config`]: what to install ([`Config`]) and the names weft owns.
//! - [`backend`]: finding iptables-nft or iptables-legacy and running them.
//! - [`ruleset`]: parsing `iptables-save` and telling weft's rules apart.
//! - [`rules`]: the rules for a configuration (pure, golden-tested).
//! - [`plan`]: the restore input for install/uninstall over the current state.
//! - [`ops`]: [`install`], [`uninstall`] and [`show`], end to end.
//!
//! Beside the rules, [`ebpf`] installs the optional eBPF acceleration of local hops
//! (`weft-iptables ebpf install`): connections between two sockets of the same host and
//! network namespace, such as an app and its sidecar, skip the TCP/IP stack. For transparent
//! mode it can also send a registered namespace's outbound connections to the proxy at
//! `connect` time (`weft-iptables ebpf transparent`), the same ones as the rules, so that the
//! app's hop to its sidecar is one of those.
//!
//! ```
//! use weft_iptables::{Config, Family, Ruleset, plan};
//! let input = plan::install(&Config::default(), Family::V4, &Ruleset::empty()).unwrap();
//! assert!(input.contains("-j REDIRECT --to-ports 15001"));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod ebpf;
pub mod error;
pub mod ops;
pub mod plan;
pub mod rules;
pub mod ruleset;

pub use backend::{Backend, Mode, ModeChoice};
pub use config::{COMMENT, Config, Family};
pub use error::{Error, Result};
pub use ops::{Change, Installed, install, show, uninstall};
pub use ruleset::Ruleset;
