//! A private PostgreSQL server for tests of the PostgreSQL store: its own data directory and
//! port on 127.0.0.1, started from the Debian package's binaries (`postgresql`, which
//! `.ci/run` installs), and stopped and deleted when its [`PgServer`] guard is dropped, also
//! while a failing test unwinds.
//!
//! PostgreSQL refuses to run as root, so under root the server runs as the package's
//! `postgres` user; the test talks to it over TCP as the superuser `weft`, trusted without a
//! password (the server listens on loopback only, and lives as long as the test).
//!
//! ```no_run
//! # fn main() -> Result<(), weft_tests::postgres::PgError> {
//! let pg = weft_tests::postgres::PgServer::start()?;
//! pg.create_database("store_test")?;
//! let url = pg.url("store_test"); // postgres://weft@127.0.0.1:<port>/store_test
//! # let _ = url;
//! # Ok(())
//! # }
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the server may take to start or stop.
const STARTUP: Duration = Duration::from_secs(30);

/// Why the server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No `initdb`/`postgres` under `/usr/lib/postgresql/*/bin`.
    #[error(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install the \
         Debian package postgresql (.ci/run does)"
    )]
    NotInstalled,
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error("running as root and there is no `postgres` user to run the server as")]
    NoUser,
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command.
        what: String,
        /// Its output, or the error starting it.
        detail: String,
    },
    /// The server did not accept connections in time.
    #[error("the PostgreSQL server did not start within {STARTUP:?}; its log:\n{log}")]
    NotReady {
        /// The end of the server's log.
        log: String,
    },
    /// A file-system operation on the server's directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// A running PostgreSQL server, stopped and deleted on drop.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    server: Option<Child>,
}

/// The newest installed server's `bin` directory.
fn find_bin() -> Result<PathBuf, PgError> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| PgError::NotInstalled)?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or(PgError::NotInstalled)
}

/// The uid and gid to run the server as: `postgres` under root, else ourselves.
fn server_user() -> Result<Option<(u32, u32)>, PgError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or(PgError::NoUser)?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

/// Makes `path` the server user's (`user` from [`server_user`]; `None`: ours already).
fn give_to(path: &Path, user: Option<(u32, u32)>) -> Result<(), PgError> {
    let Some((uid, gid)) = user else {
        return Ok(());
    };
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| PgError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// A port on 127.0.0.1 that was free a moment ago, below the ephemeral range and spread by
/// process id, so parallel tests rarely try the same one.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(6151);
    for _ in 0..1000 {
        let n = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(7727));
        let port = 15_000 + (n % 5_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    0
}

fn run(cmd: &mut Command, what: &str) -> Result<String, PgError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PgError::Command {
            what: what.into(),
            detail: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(PgError::Command {
            what: what.into(),
            detail: text,
        })
    }
}

impl PgServer {
    /// Creates a data directory and starts a server on a free port of 127.0.0.1; returns once
    /// it accepts connections.
    pub fn start() -> Result<Self, PgError> {
        Self::start_with(None, None)
    }

    /// Like [`PgServer::start`], with TLS on: the server presents `cert_pem` (its chain, PEM)
    /// with the key `key_pem`, and still accepts plaintext connections too.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Result<Self, PgError> {
        Self::start_with(Some((cert_pem, key_pem)), None)
    }

    /// Like [`PgServer::start_with_tls`], and role `cert_user` (which the caller creates) may
    /// log in only over TLS with a client certificate issued by `client_ca_pem` whose common
    /// name is `cert_user` (PostgreSQL's `cert` authentication).
    pub fn start_with_client_certs(
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: &str,
        cert_user: &str,
    ) -> Result<Self, PgError> {
        Self::start_with(Some((cert_pem, key_pem)), Some((client_ca_pem, cert_user)))
    }

    fn start_with(
        tls: Option<(&str, &str)>,
        client_certs: Option<(&str, &str)>,
    ) -> Result<Self, PgError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = find_bin()?;
        let user = server_user()?;
        let dir = std::env::temp_dir().join(format!(
            "weft-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PgError::Io { path, source }
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        // From here on, dropping `server` stops what was started and deletes `dir`.
        let mut server = PgServer {
            dir: dir.clone(),
            bin,
            port: free_port(),
            server: None,
        };
        give_to(&dir, user)?;
        let data = dir.join("data");
        let mut initdb = server.as_server_user(Command::new(server.bin.join("initdb")), user);
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "weft",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb")?;
        let mut settings: Vec<String> = Vec::new();
        if let Some((cert, key)) = tls {
            // PostgreSQL wants its key readable by its own user only.
            for (name, pem, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
                let path = dir.join(name);
                std::fs::write(&path, pem).map_err(io(&path))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(io(&path))?;
                give_to(&path, user)?;
            }
            settings.push("ssl=on".into());
            settings.push(format!(
                "ssl_cert_file={}",
                dir.join("server.crt").display()
            ));
            settings.push(format!("ssl_key_file={}", dir.join("server.key").display()));
        }
        if let Some((ca, cert_user)) = client_certs {
            let path = dir.join("client-ca.crt");
            std::fs::write(&path, ca).map_err(io(&path))?;
            give_to(&path, user)?;
            settings.push(format!("ssl_ca_file={}", path.display()));
            // First match wins: this role by certificate over TLS, and in no other way.
            let hba = data.join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).map_err(io(&hba))?;
            let rules = format!(
                "hostssl all {cert_user} 127.0.0.1/32 cert\nhost all {cert_user} 127.0.0.1/32 reject\n{rest}"
            );
            std::fs::write(&hba, rules).map_err(io(&hba))?;
        }
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log).map_err(io(&log))?;
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).map_err(io(&log))?;
        let log_err = log_file.try_clone().map_err(io(&log))?;
        let mut postgres = server.as_server_user(Command::new(server.bin.join("postgres")), user);
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "-k"])
            .arg(&dir)
            // A test's database needs no durability: skip the fsyncs.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0);
        server.server = Some(postgres.spawn().map_err(|e| PgError::Command {
            what: "postgres".into(),
            detail: e.to_string(),
        })?);
        server.wait_ready()?;
        Ok(server)
    }

    fn as_server_user(&self, mut cmd: Command, user: Option<(u32, u32)>) -> Command {
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    fn wait_ready(&mut self) -> Result<(), PgError> {
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(Ok(Some(_))) = self.server.as_mut().map(Child::try_wait) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(PgError::NotReady {
            log: self.log_tail(),
        })
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client program of the server's package, connecting as superuser `weft`.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "weft",
        ]);
        cmd
    }

    /// Creates database `name` (owned by `weft`).
    pub fn create_database(&self, name: &str) -> Result<(), PgError> {
        run(self.client("createdb").arg(name), "createdb").map(drop)
    }

    /// Runs one SQL command with `psql` on database `db`; returns its output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, PgError> {
        let mut psql = self.client("psql");
        psql.args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]);
        run(&mut psql, "psql")
    }

    /// The URL of database `db` as superuser `weft`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://weft@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            // SIGINT is PostgreSQL's fast shutdown: clients are disconnected, no waiting.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + STARTUP;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Whatever is left of the server's process group (it started one of its own).
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
