//! weft's end-to-end test support: a harness that builds small networks out
//! of Linux network namespaces, runs processes and threads inside them, and
//! always tears them down.
//!
//! - [`netns`]: [`Net`] (one test's network), [`Host`] (one namespace),
//!   [`Link`]/[`Lan`] (how hosts are joined), [`Proc`] (a child process that
//!   dies with its guard).
//! - [`cgroup`]: [`cgroup::Mount`] and [`cgroup::TestCgroup`], for tests that attach eBPF
//!   programs to a cgroup of their own.
//! - [`require_root!`]: skips a test, visibly, when not run as root.
//! - [`postgres`]: [`postgres::PgServer`], a private PostgreSQL server for the PostgreSQL
//!   store's tests.
//!
//! ```no_run
//! use std::process::Command;
//! use weft_tests::{Net, require_root};
//!
//! # fn main() -> Result<(), weft_tests::Error> {
//! require_root!(Ok(()));
//! let net = Net::new()?;
//! let a = net.host("a")?;
//! let b = net.host("b")?;
//! net.link(&a, &b)?;
//! let mut server = Command::new("sleep");
//! server.arg("30");
//! let _server = b.spawn(server)?; // killed when dropped
//! let up = a.enter(|| std::net::TcpStream::connect((b.ip(), 22)).is_ok())?;
//! # let _ = up;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cgroup;
pub mod netns;
pub mod postgres;

pub use netns::{Error, Host, Iface, Lan, Link, Net, Proc, Result, TIMEOUT, is_root};

/// Prints `SKIPPED: <why>` straight to the process's stderr, past libtest's
/// output capture, so a skipped test is visible in a normal `cargo test`.
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// Returns early from the calling test, printing `SKIPPED: needs root`, when
/// the test is not running as root. `require_root!()` returns `()`;
/// `require_root!(value)` returns `value` (e.g. `Ok(())`).
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require_root!(())
    };
    ($ret:expr) => {
        if !$crate::is_root() {
            $crate::skipped(concat!("needs root (", file!(), ":", line!(), ")"));
            return $ret;
        }
    };
}
