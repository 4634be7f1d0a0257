//! Load balancing over one subset of a service's endpoints.
//!
//! The default is power of two choices over peak-EWMA latency (as linkerd2-proxy and Finagle
//! do): two endpoints are drawn at random and the one with the lower
//! `ewma_rtt × (in_flight + 1)` wins, so a slow or busy endpoint is avoided without a global
//! view. Round robin, random and Kuma's least request (the fewest requests in flight of
//! `choiceCount` random draws) are there for those who ask.
//!
//! Why our own code and not `tower::balance::p2c` with `tower::load::PeakEwma`: tower's
//! balancer owns its endpoints as `Service`s fed by a `Discover` stream and picks one when it
//! is polled ready. Ours picks per request from route-chosen subsets that change with every
//! snapshot, while the endpoint state (latency, ejection) must survive those changes; the
//! state here is a handful of atomics per endpoint, shared by all subsets that hold it.
//!
//! An endpoint that fails to connect is ejected for a while ([`EJECT_BASE`], doubling with
//! consecutive failures up to [`EJECT_MAX`]); picks skip ejected endpoints unless all are.

use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How long a first connect failure ejects an endpoint.
pub const EJECT_BASE: Duration = Duration::from_secs(5);
/// The longest ejection, reached after repeated failures.
pub const EJECT_MAX: Duration = Duration::from_secs(60);
/// The latency assumed for an endpoint nothing has been measured for.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// How fast old latency observations fade.
const DECAY: Duration = Duration::from_secs(10);

/// The load-balancing algorithm of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbKind {
    /// Power of two choices over peak-EWMA latency and in-flight requests.
    #[default]
    P2cEwma,
    /// Each endpoint in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Kuma's `leastRequest` (Envoy's least request): of `choices` endpoints drawn at random,
    /// the one with the fewest requests in flight.
    LeastRequest {
        /// How many endpoints are drawn (`choiceCount`, at least 2).
        choices: u32,
    },
}

fn now_nanos() -> u64 {
    nanos_at(Instant::now())
}

/// `at` in process nanos (since the first call).
fn nanos_at(at: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| at);
    u64::try_from(at.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX)
}

/// What the proxy knows of one endpoint: its latency, its load and whether it is ejected.
/// Shared by every route that holds the endpoint and kept across config updates.
#[derive(Debug)]
pub struct EndpointState {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// Peak-EWMA round-trip estimate, nanoseconds.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated (process nanos).
    stamp_ns: AtomicU64,
    in_flight: AtomicUsize,
    /// Ejected until this instant (process nanos); 0 when not ejected.
    ejected_until: AtomicU64,
    failures: AtomicU32,
}

impl EndpointState {
    /// A fresh endpoint state.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            ewma_ns: AtomicU64::new(DEFAULT_RTT.as_nanos() as u64),
            stamp_ns: AtomicU64::new(now_nanos()),
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    /// Whether the endpoint is ejected now.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_nanos() < until
    }

    /// Records a failed connect: ejects the endpoint, longer with each consecutive failure.
    pub fn connect_failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(8);
        let eject = EJECT_BASE.saturating_mul(1 << n).min(EJECT_MAX);
        let until = now_nanos().saturating_add(eject.as_nanos() as u64);
        self.ejected_until.store(until, Ordering::Relaxed);
    }

    /// Records a successful connect: the endpoint is back.
    pub fn connect_succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// Starts one request: counts it in flight until the guard is dropped, and feeds the time
    /// until [`InFlight::observe`] (the response head) into the latency estimate.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: tokio::time::Instant::now(),
        }
    }

    /// Adds one latency observation made at `at`: a higher value is taken at once (peak), a
    /// lower one is blended in with a weight that grows with the time since the last
    /// observation.
    fn observe(&self, rtt: Duration, at: Instant) {
        let rtt = rtt.as_nanos() as u64;
        let now = nanos_at(at);
        let prev = self.ewma_ns.load(Ordering::Relaxed);
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed));
            let decay = (-(elapsed as f64) / DECAY.as_nanos() as f64).exp();
            (prev as f64 * decay + rtt as f64 * (1.0 - decay)) as u64
        };
        // Racing updates may lose one observation; the estimate stays sound.
        self.ewma_ns.store(next.max(1), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }

    /// The cost P2C compares: latency estimate × (requests in flight + 1).
    /// Requests in flight to the endpoint now.
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn cost(&self) -> f64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed) as f64;
        self.ewma_ns.load(Ordering::Relaxed) as f64 * (in_flight + 1.0)
    }
}

/// One request in flight to an endpoint (see [`EndpointState::start`]).
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    /// tokio's clock (the same as std's outside paused tests), so that the request's
    /// deadline can be counted from it without reading the clock again.
    started: tokio::time::Instant,
}

impl InFlight {
    /// When the request started.
    pub fn started(&self) -> tokio::time::Instant {
        self.started
    }

    /// The response head arrived: feed the latency into the estimate. One clock read for
    /// both the latency and the estimate's timestamp.
    pub fn observe(&self) {
        let now = tokio::time::Instant::now();
        self.endpoint.observe(now - self.started, now.into_std());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Endpoint states by address, so that a new config keeps what the old one learned.
#[derive(Debug, Default)]
pub struct EndpointStates {
    states: Mutex<HashMap<SocketAddr, Weak<EndpointState>>>,
}

impl EndpointStates {
    /// The state of `addr`, created on first use. Called while building a config, never per
    /// request.
    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let Ok(mut states) = self.states.lock() else {
            return Arc::new(EndpointState::new(addr));
        };
        if let Some(s) = states.get(&addr).and_then(Weak::upgrade) {
            return s;
        }
        // Forget endpoints no config holds any more before growing.
        if states.len() >= 64 && states.len().is_power_of_two() {
            states.retain(|_, w| w.strong_count() > 0);
        }
        let s = Arc::new(EndpointState::new(addr));
        states.insert(addr, Arc::downgrade(&s));
        s
    }
}

/// The endpoints of one subset and how to choose among them.
#[derive(Debug)]
pub struct Balancer {
    kind: LbKind,
    endpoints: Vec<Arc<EndpointState>>,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer of `kind` over `endpoints`.
    pub fn new(kind: LbKind, endpoints: Vec<Arc<EndpointState>>) -> Self {
        Self {
            kind,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoints, in config order.
    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// Whether there is no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Picks an endpoint, skipping ejected ones (unless every one is ejected) and `exclude`
    /// (endpoints a request has already failed to connect to).
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<&Arc<EndpointState>> {
        let usable = |e: &&Arc<EndpointState>| !exclude.contains(&e.addr);
        let n = self.endpoints.len();
        match n {
            0 => return None,
            1 => return self.endpoints.first().filter(usable),
            _ => {}
        }
        let available = |e: &&Arc<EndpointState>| usable(e) && !e.is_ejected();
        let chosen = match self.kind {
            LbKind::RoundRobin => self.round_robin(available),
            LbKind::Random => self.random(available),
            LbKind::P2cEwma => self.p2c(available),
            LbKind::LeastRequest { choices } => self.least_request(choices, available),
        };
        // Every endpoint ejected: better try one than fail the request outright.
        chosen.or_else(|| self.round_robin(usable))
    }

    fn round_robin(
        &self,
        ok: impl Fn(&&Arc<EndpointState>) -> bool,
    ) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|e| ok(e))
    }

    fn random(&self, ok: impl Fn(&&Arc<EndpointState>) -> bool) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let start = rand::rng().random_range(0..n);
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|e| ok(e))
    }

    fn p2c(&self, ok: impl Fn(&&Arc<EndpointState>) -> bool) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let mut rng = rand::rng();
        let a = rng.random_range(0..n);
        let mut b = rng.random_range(0..n - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (&self.endpoints[a], &self.endpoints[b]);
        match (ok(&a), ok(&b)) {
            (true, true) => Some(if a.cost() <= b.cost() { a } else { b }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => self.random(ok),
        }
    }
}

impl Balancer {
    fn least_request(
        &self,
        choices: u32,
        ok: impl Fn(&&Arc<EndpointState>) -> bool,
    ) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let mut rng = rand::rng();
        // Drawn at random with replacement, as Envoy does, so that of endpoints equally busy
        // each is as likely (a scan would always take the first of equals).
        (0..choices)
            .map(|_| &self.endpoints[rng.random_range(0..n)])
            .filter(|e| ok(e))
            .min_by_key(|e| e.in_flight())
            .or_else(|| self.random(ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], i))
    }

    fn balancer(kind: LbKind, n: u16) -> Balancer {
        let states = EndpointStates::default();
        Balancer::new(kind, (1..=n).map(|i| states.get(addr(i))).collect())
    }

    #[test]
    fn least_request_takes_the_fewest_in_flight_of_its_choices() {
        // Three draws of three endpoints: the idle one wins whenever it is drawn (70 %).
        let b = balancer(LbKind::LeastRequest { choices: 3 }, 3);
        let _busy: Vec<InFlight> = [0, 0, 2, 2, 2]
            .iter()
            .map(|i| b.endpoints()[*i].start())
            .collect();
        let idle = (0..300)
            .filter(|_| b.pick(&[]).unwrap().addr == addr(2))
            .count();
        assert!(idle > 150, "the idle endpoint only {idle} times of 300");
        // Equally busy endpoints share the traffic.
        let b = balancer(LbKind::LeastRequest { choices: 2 }, 2);
        let first = (0..300)
            .filter(|_| b.pick(&[]).unwrap().addr == addr(1))
            .count();
        assert!(
            (75..=225).contains(&first),
            "{first} of 300 to the first of two idle"
        );
        // Two choices of three: the busiest is never picked unless drawn twice.
        let b = balancer(LbKind::LeastRequest { choices: 2 }, 3);
        let _busy: Vec<InFlight> = (0..5).map(|_| b.endpoints()[0].start()).collect();
        let busiest = (0..300)
            .filter(|_| b.pick(&[]).unwrap().addr == addr(1))
            .count();
        assert!(busiest < 100, "picked the busiest {busiest} times of 300");
    }

    #[test]
    fn round_robin_visits_each_in_turn() {
        let b = balancer(LbKind::RoundRobin, 3);
        let picks: Vec<u16> = (0..6).map(|_| b.pick(&[]).unwrap().addr.port()).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_all_are() {
        for kind in [LbKind::RoundRobin, LbKind::Random, LbKind::P2cEwma] {
            let b = balancer(kind, 3);
            b.endpoints()[0].connect_failed();
            b.endpoints()[1].connect_failed();
            for _ in 0..50 {
                assert_eq!(b.pick(&[]).unwrap().addr, addr(3), "{kind:?}");
            }
            b.endpoints()[2].connect_failed();
            assert!(b.pick(&[]).is_some(), "all ejected still yields one");
            b.endpoints()[0].connect_succeeded();
            assert!(!b.endpoints()[0].is_ejected());
            assert_eq!(b.pick(&[addr(2), addr(3)]).unwrap().addr, addr(1));
        }
    }

    #[test]
    fn p2c_prefers_the_faster_and_less_loaded_endpoint() {
        let b = balancer(LbKind::P2cEwma, 2);
        // Endpoint 1 answered slowly once: peak-EWMA takes the peak at once.
        b.endpoints()[0].observe(Duration::from_millis(50), Instant::now());
        b.endpoints()[1].observe(Duration::from_micros(200), Instant::now());
        let fast = (0..100)
            .filter(|_| b.pick(&[]).unwrap().addr == addr(2))
            .count();
        assert_eq!(fast, 100);
        // Load counts too: many requests in flight on 2 make 1 the better choice.
        let b = balancer(LbKind::P2cEwma, 2);
        let _busy: Vec<InFlight> = (0..10).map(|_| b.endpoints()[1].start()).collect();
        assert_eq!(b.pick(&[]).unwrap().addr, addr(1));
    }

    #[test]
    fn state_survives_a_new_config() {
        let states = EndpointStates::default();
        let first = states.get(addr(1));
        first.connect_failed();
        let again = states.get(addr(1));
        assert!(again.is_ejected());
        drop((first, again));
        assert!(!states.get(addr(1)).is_ejected(), "forgotten once unused");
    }
}
