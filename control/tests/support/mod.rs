//! Runs the real `weft-control` binary for tests and drives it with the real client.

#![allow(dead_code)]

pub mod in_process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weft_control::client::Client;

pub const WEFT_CONTROL: &str = env!("CARGO_BIN_EXE_weft-control");
pub const WEFTCTL: &str = env!("CARGO_BIN_EXE_weftctl");

/// A `weft-control run` process, killed on drop.
pub struct ControlPlane {
    pub child: Child,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
}

/// A free port on 127.0.0.1, below Linux's ephemeral range (32768+), so the kernel does not
/// hand it to some other test's outgoing connection between our check and our bind; ports are
/// spread by process id and a counter, so parallel tests rarely try the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..1000 {
        let n = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found below the ephemeral range");
}

impl ControlPlane {
    pub fn start(data_dir: &Path, extra: &[&str]) -> ControlPlane {
        let cp = Self::spawn(data_dir, extra);
        cp.wait_ready(Duration::from_millis(50));
        cp
    }

    /// Starts the process and returns at once, before it answers.
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> ControlPlane {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new(WEFT_CONTROL)
            .args(["run", "--data-dir"])
            .arg(data_dir)
            .args(["--api-address", &api.to_string()])
            .args(["--dp-server-address", "127.0.0.1:0"])
            .args(extra)
            .env("WEFT_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn weft-control");
        ControlPlane {
            child,
            api,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Polls the REST API every `interval` until it answers (at most 20 s).
    pub fn wait_ready(&self, interval: Duration) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.client().get("/").is_ok() {
                return;
            }
            std::thread::sleep(interval);
        }
        panic!("weft-control did not come up on {}", self.api);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url(), None).expect("client")
    }

    /// Runs `weftctl` against this control plane; returns (exit code, stdout, stderr).
    pub fn weftctl(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        weftctl(&self.url(), args, stdin)
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn weftctl(url: &str, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(WEFTCTL)
        .arg("--api-url")
        .arg(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weftctl");
    if let Some(mut pipe) = child.stdin.take()
        && let Some(text) = stdin
    {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("weftctl output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub fn examples_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"))
}
