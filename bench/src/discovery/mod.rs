//! The discovery benchmark (`weft-bench discovery`): N simulated proxies hold discovery
//! streams to one control plane; a policy applied through the REST API must reach all of
//! them. Measures, per proxy, the time from the apply to its ACK of the snapshot that holds
//! the change, and the control plane's memory.
//!
//! # A run
//! 1. [`control::Process`] starts `weft-control run` on free loopback ports (the
//!    smoke test uses an in-process control plane instead; see [`control::Target`]).
//! 2. A mesh `bench` with builtin mTLS is applied; a token is issued for every proxy.
//! 3. N proxies ([`proxy`]) register, `--streams-per-connection` of them per HTTP/2
//!    connection, at most `--register-concurrency` waiting for their first snapshot at a
//!    time. Each is dataplane `dp-<i>` at its own address, with one inbound of service
//!    `svc-<i mod services>`. Registration ends when every proxy has a snapshot;
//!    convergence when every snapshot lists all N endpoints.
//! 4. Each round PUTs the MeshTrafficPermission `bench-allow` (targetRef Mesh, so every
//!    proxy's inbound permissions change) with a `from` entry naming the source service
//!    `bench-round-<r>`, then waits until every proxy has ACKed a snapshot carrying that
//!    marker. A proxy's latency runs from just before the PUT request is sent to the moment
//!    it queued its ACK.
//! 5. The control plane's RSS is read once idle (after convergence), sampled every 5 ms
//!    through the rounds, and its lifetime peak (`VmHWM`) read at the end.

pub mod control;
pub mod proxy;
pub mod report;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::{Semaphore, mpsc};

use control::{Rest, RssSampler, Target};
use proxy::{Event, Registration};
use report::{Report, Round};

/// The mesh the benchmark works in.
pub const MESH: &str = "bench";
/// The policy each round re-applies.
pub const POLICY: &str = "bench-allow";

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Simulated proxies.
    pub proxies: usize,
    /// Services the proxies are spread over.
    pub services: usize,
    /// Discovery streams per HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Proxies waiting for their first snapshot at once.
    pub register_concurrency: usize,
    /// Policy applies measured.
    pub rounds: u32,
    /// Quiet time after each round (stray pushes would show up in the next round's count).
    pub pause: Duration,
    /// How long registration, convergence or one round may take.
    pub timeout: Duration,
    /// Print progress to stderr.
    pub progress: bool,
    /// Proxies keep the parts that did not change (`Register.keeps_parts`); without it,
    /// every snapshot is complete.
    pub keep_parts: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            proxies: 100,
            services: 10,
            streams_per_connection: 100,
            register_concurrency: 100,
            rounds: 5,
            pause: Duration::from_millis(500),
            timeout: Duration::from_secs(60),
            progress: false,
            keep_parts: true,
        }
    }
}

/// The Dataplane of proxy `i`: its own address, one inbound of service `svc-<i mod services>`.
pub fn dataplane(i: usize, services: usize) -> String {
    let n = i + 1;
    format!(
        "type: Dataplane\nmesh: {MESH}\nname: dp-{i}\nnetworking:\n  address: 10.{}.{}.{}\n  inbound:\n  - port: 8080\n    servicePort: 80\n    tags:\n      kuma.io/service: svc-{}\n      kuma.io/protocol: http\n",
        (n >> 16) & 0xff,
        (n >> 8) & 0xff,
        n & 0xff,
        i % services.max(1),
    )
}

fn mesh_yaml() -> String {
    format!(
        "type: Mesh\nname: {MESH}\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n"
    )
}

/// The policy of round `round`: every proxy's inbounds allow the round's marker service and
/// then the whole mesh.
pub fn policy_yaml(round: u32) -> String {
    format!(
        "type: MeshTrafficPermission\nmesh: {MESH}\nname: {POLICY}\nspec:\n  targetRef: {{kind: Mesh}}\n  from:\n  - targetRef: {{kind: MeshService, name: {}}}\n    default: {{action: Allow}}\n  - targetRef: {{kind: Mesh}}\n    default: {{action: Allow}}\n",
        proxy::round_marker(round)
    )
}

/// What the coordinator knows about the fleet, fed by proxy events.
struct Fleet {
    want_endpoints: usize,
    first: Vec<Option<Instant>>,
    converged: Vec<Option<Instant>>,
    /// The round being measured and when each proxy ACKed its marker.
    round: u32,
    round_acks: Vec<Option<Instant>>,
    /// ACKs (pushes) seen since the round began.
    pushes: usize,
    /// Their bytes.
    pushed_bytes: usize,
    snapshot_bytes: usize,
    first_count: usize,
    converged_count: usize,
    round_count: usize,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        Fleet {
            want_endpoints: n,
            first: vec![None; n],
            converged: vec![None; n],
            round: 0,
            round_acks: vec![None; n],
            pushes: 0,
            pushed_bytes: 0,
            snapshot_bytes: 0,
            first_count: 0,
            converged_count: 0,
            round_count: 0,
        }
    }

    fn apply(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Acked {
                proxy,
                round,
                endpoints,
                bytes,
                at,
            } => {
                self.pushes += 1;
                self.pushed_bytes += bytes;
                self.snapshot_bytes = self.snapshot_bytes.max(bytes);
                if self.first[proxy].is_none() {
                    self.first[proxy] = Some(at);
                    self.first_count += 1;
                }
                if endpoints >= self.want_endpoints && self.converged[proxy].is_none() {
                    self.converged[proxy] = Some(at);
                    self.converged_count += 1;
                }
                if self.round > 0 && round == self.round && self.round_acks[proxy].is_none() {
                    self.round_acks[proxy] = Some(at);
                    self.round_count += 1;
                }
                Ok(())
            }
            Event::Ended { proxy, reason } => bail!("proxy dp-{proxy}'s stream ended: {reason}"),
        }
    }

    fn begin_round(&mut self, round: u32) {
        self.round = round;
        self.round_acks.iter_mut().for_each(|a| *a = None);
        self.round_count = 0;
        self.pushes = 0;
        self.pushed_bytes = 0;
    }
}

/// Feeds events into `fleet` until `done` holds; errors after `timeout`.
async fn until(
    events: &mut mpsc::UnboundedReceiver<Event>,
    fleet: &mut Fleet,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Fleet) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(fleet) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) => fleet.apply(e)?,
            Ok(None) => bail!("{what}: every proxy is gone"),
            Err(_) => bail!("{what}: not done within {timeout:?}"),
        }
    }
    Ok(())
}

/// Feeds events into `fleet` for `d` (no condition: counts stray pushes).
async fn drain_for(
    events: &mut mpsc::UnboundedReceiver<Event>,
    fleet: &mut Fleet,
    d: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.recv()).await {
        fleet.apply(e)?;
    }
    Ok(())
}

fn say(cfg: &Config, msg: impl std::fmt::Display) {
    if cfg.progress {
        eprintln!("{msg}");
    }
}

/// Runs the benchmark against `target`. Must run inside a multi-threaded tokio runtime.
pub async fn run(cfg: &Config, target: &Target) -> Result<Report> {
    if cfg.proxies == 0 || cfg.streams_per_connection == 0 || cfg.register_concurrency == 0 {
        bail!("--proxies, --streams-per-connection and --register-concurrency must be > 0");
    }
    let n = cfg.proxies;
    let rest = Rest::new(target.api);
    rest.put(&format!("/meshes/{MESH}"), mesh_yaml())
        .await
        .context("creating the mesh")?;

    say(cfg, format_args!("issuing {n} dataplane tokens"));
    let tokens = issue_tokens(&rest, n).await?;

    let connections = n.div_ceil(cfg.streams_per_connection);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            proxy::connect(target.dp, &target.ca_pem, cfg.streams_per_connection)
                .await
                .context("connecting to the dataplane server")?,
        );
    }

    say(
        cfg,
        format_args!(
            "registering {n} proxies over {connections} connections ({} at a time)",
            cfg.register_concurrency
        ),
    );
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let slots = Arc::new(Semaphore::new(cfg.register_concurrency));
    let mut fleet = Fleet::new(n);
    let reg_start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue: VecDeque<(usize, String)> = tokens.into_iter().enumerate().collect();
    while let Some((index, token)) = queue.pop_front() {
        // Acquire here so registrations start in order, `register_concurrency` at a time.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            e = events.recv() => {
                fleet.apply(e.context("event channel closed")?)?;
                queue.push_front((index, token));
                continue;
            }
        };
        let reg = Registration {
            index,
            dataplane: dataplane(index, cfg.services),
            token,
            keep_parts: cfg.keep_parts,
        };
        let channel = channels[index / cfg.streams_per_connection].clone();
        tasks.spawn(proxy::run(channel, reg, Some(permit), events_tx.clone()));
    }
    drop(events_tx);
    until(&mut events, &mut fleet, cfg.timeout, "registration", |f| {
        f.first_count == n
    })
    .await?;
    let registration = reg_start.elapsed();
    until(&mut events, &mut fleet, cfg.timeout, "convergence", |f| {
        f.converged_count == n
    })
    .await?;
    let converged = reg_start.elapsed();
    say(
        cfg,
        format_args!(
            "registered in {:.2} s, converged in {:.2} s",
            registration.as_secs_f64(),
            converged.as_secs_f64()
        ),
    );

    // Idle: let stray pushes settle, then read memory.
    drain_for(&mut events, &mut fleet, Duration::from_secs(1)).await?;
    let rss_idle = target.pid.and_then(control::rss_bytes);

    let sampler = target
        .pid
        .map(|pid| RssSampler::start(pid, Duration::from_millis(5)));
    let mut rounds = Vec::new();
    for r in 1..=cfg.rounds {
        fleet.begin_round(r);
        let cpu_before = target.pid.and_then(control::cpu_time);
        let t0 = Instant::now();
        rest.put(
            &format!("/meshes/{MESH}/meshtrafficpermissions/{POLICY}"),
            policy_yaml(r),
        )
        .await
        .with_context(|| format!("round {r}: applying the policy"))?;
        let apply = t0.elapsed();
        until(&mut events, &mut fleet, cfg.timeout, "a round", |f| {
            f.round_count == n
        })
        .await
        .with_context(|| format!("round {r}"))?;
        let cpu_after = target.pid.and_then(control::cpu_time);
        let latencies: Vec<Duration> = fleet
            .round_acks
            .iter()
            .map(|a| a.map_or(Duration::MAX, |a| a.duration_since(t0)))
            .collect();
        drain_for(&mut events, &mut fleet, cfg.pause).await?;
        let round = Round::new(
            r,
            apply,
            latencies,
            cpu_before.zip(cpu_after).map(|(b, a)| a.saturating_sub(b)),
            fleet.pushes,
            fleet.pushed_bytes,
        );
        say(cfg, round.to_line());
        rounds.push(round);
    }
    let rss_push_peak = sampler.map(RssSampler::stop);
    let rss_hwm = target.pid.and_then(control::hwm_bytes);
    tasks.abort_all();

    Ok(Report::new(
        cfg,
        connections,
        registration,
        converged,
        fleet.snapshot_bytes,
        rounds,
        rss_idle,
        rss_push_peak,
        rss_hwm,
    ))
}

/// Issues one token per proxy through the REST API, a few requests at a time.
async fn issue_tokens(rest: &Rest, n: usize) -> Result<Vec<String>> {
    const PARALLEL: usize = 16;
    let mut tokens = vec![String::new(); n];
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < PARALLEL {
            let rest = rest.clone();
            let i = next;
            set.spawn(async move { (i, rest.dataplane_token(MESH, &format!("dp-{i}")).await) });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            let (i, token) = done?;
            tokens[i] = token.with_context(|| format!("token for dp-{i}"))?;
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parse() {
        for yaml in [
            dataplane(0, 10),
            dataplane(70_000, 10),
            mesh_yaml(),
            policy_yaml(3),
        ] {
            weft_api::parse::parse_documents(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
        assert!(dataplane(70_000, 10).contains("address: 10.1.17.113"));
    }
}
