//! Finding and running the iptables binaries: iptables-nft or
//! iptables-legacy, chosen the way Kuma chooses (`kuma.md` §5).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use crate::config::Family;
use crate::error::{Error, Result};

/// Which kernel interface the rules go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `iptables-nft`: the xtables front end over nf_tables.
    Nft,
    /// `iptables-legacy`: the old `ip_tables` kernel interface.
    Legacy,
}

impl Mode {
    fn suffix(self) -> &'static str {
        match self {
            Mode::Nft => "nft",
            Mode::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

/// How to pick the [`Mode`]: detect it, or force one (`--iptables-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Detect: the one that works; if both work, the one that already has
    /// rules (nft when both have, unless only legacy has Docker's
    /// `DOCKER_OUTPUT`); nft on a clean host.
    #[default]
    Auto,
    /// Always iptables-nft.
    Nft,
    /// Always iptables-legacy.
    Legacy,
}

impl FromStr for ModeChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ModeChoice::Auto),
            "nft" => Ok(ModeChoice::Nft),
            "legacy" => Ok(ModeChoice::Legacy),
            other => Err(Error::InvalidConfig(format!(
                "--iptables-mode must be nft, legacy or auto, not {other:?}"
            ))),
        }
    }
}

/// The pair of binaries for one family in one mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The mode these binaries use.
    pub mode: Mode,
    /// The family they handle.
    pub family: Family,
    /// `iptables-save` (or `ip6tables-save`) in that mode.
    pub save: PathBuf,
    /// `iptables-restore` (or `ip6tables-restore`) in that mode.
    pub restore: PathBuf,
}

/// Directories searched after `$PATH`: the sbin directories are often
/// missing from a non-root `$PATH`.
const EXTRA_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// Finds `name` in `$PATH` or the sbin directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// What probing one mode found.
struct Probe {
    backend: Backend,
    works: Result<String>,
}

impl Probe {
    fn has_rules(&self) -> bool {
        matches!(&self.works, Ok(save) if save.lines().any(|l| l.starts_with("-A ")))
    }

    fn has_docker_output(&self) -> bool {
        matches!(&self.works, Ok(save) if save.lines().any(|l| l.starts_with(":DOCKER_OUTPUT ")))
    }
}

impl Backend {
    /// The binaries for `family` in `mode`, if they are installed. Falls back
    /// to the unsuffixed `iptables-save`/`iptables-restore` when they report
    /// being that mode (distributions without the `-nft`/`-legacy` names).
    pub fn find(family: Family, mode: Mode) -> Option<Backend> {
        let stem = family.stem();
        let suffixed = (
            find_binary(&format!("{stem}-{}-save", mode.suffix())),
            find_binary(&format!("{stem}-{}-restore", mode.suffix())),
        );
        if let (Some(save), Some(restore)) = suffixed {
            return Some(Backend {
                mode,
                family,
                save,
                restore,
            });
        }
        let save = find_binary(&format!("{stem}-save"))?;
        let restore = find_binary(&format!("{stem}-restore"))?;
        let version = Command::new(&save).arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&version.stdout);
        let plain_mode = if text.contains("nf_tables") {
            Mode::Nft
        } else {
            Mode::Legacy
        };
        (plain_mode == mode).then_some(Backend {
            mode,
            family,
            save,
            restore,
        })
    }

    /// Picks the backend for `family` as `choice` says.
    pub fn detect(family: Family, choice: ModeChoice) -> Result<Backend> {
        let looked_for = || {
            let stem = family.stem();
            format!("looked for {stem}-nft-save, {stem}-legacy-save and {stem}-save")
        };
        let forced = match choice {
            ModeChoice::Auto => None,
            ModeChoice::Nft => Some(Mode::Nft),
            ModeChoice::Legacy => Some(Mode::Legacy),
        };
        if let Some(mode) = forced {
            return Backend::find(family, mode).ok_or_else(|| Error::NoIptables {
                looked_for: format!("{}, in {mode} mode", looked_for()),
            });
        }
        let probes: Vec<Probe> = [Mode::Nft, Mode::Legacy]
            .into_iter()
            .filter_map(|m| Backend::find(family, m))
            .map(|backend| Probe {
                works: backend.save_all(),
                backend,
            })
            .collect();
        if probes.is_empty() {
            return Err(Error::NoIptables {
                looked_for: looked_for(),
            });
        }
        let working: Vec<&Probe> = probes.iter().filter(|p| p.works.is_ok()).collect();
        let pick = |mode: Mode| {
            working
                .iter()
                .find(|p| p.backend.mode == mode)
                .map(|p| p.backend.clone())
        };
        match working.as_slice() {
            [] => {
                let reasons: Vec<String> = probes
                    .iter()
                    .filter_map(|p| p.works.as_ref().err().map(|e| e.to_string()))
                    .collect();
                Err(Error::NoWorkingBackend(reasons.join("; ")))
            }
            [only] => Ok(only.backend.clone()),
            _ => {
                let nft = working.iter().find(|p| p.backend.mode == Mode::Nft);
                let legacy = working.iter().find(|p| p.backend.mode == Mode::Legacy);
                let (nft, legacy) = (nft.expect("two working"), legacy.expect("two working"));
                let mode = if nft.has_rules() && legacy.has_rules() {
                    if legacy.has_docker_output() && !nft.has_docker_output() {
                        Mode::Legacy
                    } else {
                        Mode::Nft
                    }
                } else if legacy.has_rules() {
                    Mode::Legacy
                } else {
                    Mode::Nft
                };
                Ok(pick(mode).expect("both modes work"))
            }
        }
    }

    /// `iptables-save` of every table.
    fn save_all(&self) -> Result<String> {
        run(Command::new(&self.save), None)
    }

    /// `iptables-save -t nat`: the table weft writes to.
    pub fn save_nat(&self) -> Result<String> {
        let mut cmd = Command::new(&self.save);
        cmd.args(["-t", "nat"]);
        run(cmd, None)
    }

    /// Applies `input` atomically with `iptables-restore --noflush --wait`.
    pub fn restore(&self, input: &str) -> Result<()> {
        let mut cmd = Command::new(&self.restore);
        cmd.args(["--noflush", "--wait"]);
        run(cmd, Some(input)).map(drop)
    }
}

/// Runs `cmd`, feeding it `stdin`, and returns its stdout when it succeeds.
pub(crate) fn run(mut cmd: Command, stdin: Option<&str>) -> Result<String> {
    let program = PathBuf::from(cmd.get_program());
    let spawn_err = |source| Error::Spawn {
        program: program.clone(),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A failed write shows up as the command's own failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            program,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Makes sure the IPv6 loop-guard address `::6/128` is on `lo`, as the
/// proxy binds its inbound forwarding to it.
pub fn ensure_v6_loop_guard() -> Result<()> {
    let ip = find_binary("ip").ok_or(Error::NoIproute2)?;
    let mut show = Command::new(&ip);
    show.args(["-6", "addr", "show", "dev", "lo"]);
    if run(show, None)?.contains("::6/128") {
        return Ok(());
    }
    let mut add = Command::new(&ip);
    add.args(["-6", "addr", "add", "::6/128", "dev", "lo"]);
    run(add, None).map(drop)
}
