//! The control plane under test: the `weft-control` process the benchmark starts, its REST
//! API, and what `/proc` says about it (resident memory, CPU time).
//!
//! The control plane runs as a process of its own so that its RSS is its own, not the
//! simulated proxies'.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Where the simulated proxies and the REST client find the control plane.
#[derive(Debug, Clone)]
pub struct Target {
    /// The REST API.
    pub api: SocketAddr,
    /// The dataplane gRPC server (TLS).
    pub dp: SocketAddr,
    /// PEM of the CA that signed the dataplane server's certificate.
    pub ca_pem: String,
    /// The control plane's process, for its memory and CPU figures (`None`: in-process,
    /// no figures).
    pub pid: Option<u32>,
}

/// A `weft-control run` child process with a fresh data directory; stopped on drop.
pub struct Process {
    child: Child,
    target: Target,
    _data_dir: tempfile::TempDir,
}

impl Process {
    /// Starts `bin run` on free loopback ports and waits until its REST API answers and its
    /// dataplane CA is written.
    pub async fn start(bin: &Path) -> Result<Process> {
        let data_dir = tempfile::Builder::new()
            .prefix("weft-discovery-bench-")
            .tempdir()
            .context("creating the control plane's data directory")?;
        let api = free_port()?;
        let dp = free_port()?;
        let log_path = data_dir.path().join("weft-control.log");
        let log = std::fs::File::create(&log_path).context("creating the control plane log")?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--api-address")
            .arg(api.to_string())
            .arg("--dp-server-address")
            .arg(dp.to_string())
            // One log line per registration would be the benchmark's own noise.
            .env("WEFT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut process = Process {
            target: Target {
                api,
                dp,
                ca_pem: String::new(),
                pid: Some(child.id()),
            },
            child,
            _data_dir: data_dir,
        };
        let rest = Rest::new(api);
        let ca_path = process._data_dir.path().join("cp-ca.pem");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = process.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{} exited ({status}) before serving:\n{log}", bin.display());
            }
            if rest.get("/").await.is_ok()
                && let Ok(pem) = std::fs::read_to_string(&ca_path)
                && !pem.is_empty()
            {
                process.target.ca_pem = pem;
                return Ok(process);
            }
            if Instant::now() > deadline {
                bail!("{} did not serve within 20 s", bin.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where it listens.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The default `weft-control` binary: beside this executable (same cargo profile), else
/// whatever `PATH` finds.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("weft-control")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("weft-control"))
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// A small client for the control plane's REST API (HTTP/1.1, loopback, no auth).
#[derive(Clone)]
pub struct Rest {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Rest {
    /// A client for the API at `addr`.
    pub fn new(addr: SocketAddr) -> Rest {
        Rest {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `GET path`; errors on a non-2xx answer.
    pub async fn get(&self, path: &str) -> Result<String> {
        self.call(Method::GET, path, String::new()).await
    }

    /// `PUT path` with a YAML body; errors on a non-2xx answer.
    pub async fn put(&self, path: &str, yaml: String) -> Result<String> {
        self.call(Method::PUT, path, yaml).await
    }

    /// `POST /tokens/dataplane`: a token for dataplane `name` of `mesh`.
    pub async fn dataplane_token(&self, mesh: &str, name: &str) -> Result<String> {
        let body = serde_json::json!({ "mesh": mesh, "name": name }).to_string();
        self.call(Method::POST, "/tokens/dataplane", body).await
    }

    async fn call(&self, method: Method, path: &str, body: String) -> Result<String> {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::from(body)))?;
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(text)
    }
}

/// A process's resident set size now (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

/// A process's peak resident set size so far (`VmHWM`), in bytes.
pub fn hwm_bytes(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:").map(|k| k * 1024)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User + system CPU time a process has used, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on;
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|h| u64::try_from(h).ok())
        .filter(|h| *h > 0)
        .unwrap_or(100);
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Samples a process's RSS every few milliseconds on a thread of its own and keeps the
/// maximum, between [`RssSampler::start`] and [`RssSampler::stop`].
pub struct RssSampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling `pid` every `every`.
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let max = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(pid) {
                    m.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        RssSampler {
            max,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the largest RSS seen, in bytes.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).is_some_and(|r| r > 0));
        assert!(hwm_bytes(pid).is_some_and(|h| h > 0));
        assert!(cpu_time(pid).is_some());
        let sampler = RssSampler::start(pid, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(10));
        assert!(sampler.stop() > 0);
    }
}
