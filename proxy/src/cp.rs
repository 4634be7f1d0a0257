//! The control plane's replicas as the proxy reaches them: one lazily connecting gRPC channel
//! per address of `--cp-address` (a comma-separated list), and which one is in use.
//!
//! The proxy talks to one replica at a time. When a call to it fails (the replica is down, or
//! closed the stream as it shut down), the next call goes to the next address, so a proxy
//! given every replica's address rides out the loss of any of them: replicas share one store
//! and serve the same configuration. One address, the usual case, behaves as a plain channel:
//! a name that resolves to several replicas works too, since each connection attempt tries
//! the name's addresses in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How often the proxy pings its control-plane connection, and how long it waits for the
/// answer before it gives the connection up (a stream is long-lived and mostly quiet).
pub const CP_KEEPALIVE: Duration = Duration::from_secs(20);
/// Why the control plane's addresses are unusable.
#[derive(Debug, thiserror::Error)]
pub enum CpAddressError {
    /// `--cp-address` names no address.
    #[error("--cp-address: no address given")]
    Empty,
    /// One address is not a URL.
    #[error("--cp-address {address:?}: {reason}")]
    Invalid {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// The channels to the control plane's replicas. Clones share the channels and which one is in
/// use.
#[derive(Debug, Clone)]
pub struct CpChannels {
    replicas: Arc<[(String, Channel)]>,
    current: Arc<AtomicUsize>,
}

impl CpChannels {
    /// Channels to each address of `addresses` (`https://HOST:PORT`, comma-separated),
    /// trusting `ca_pem` for the replicas' certificates; each call times out after `timeout`.
    pub fn new(addresses: &str, ca_pem: &[u8], timeout: Duration) -> Result<Self, CpAddressError> {
        let replicas = addresses
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|address| {
                let invalid = |reason: String| CpAddressError::Invalid {
                    address: address.to_string(),
                    reason,
                };
                let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
                let channel = Endpoint::from_shared(address.to_string())
                    .map_err(|e| invalid(e.to_string()))?
                    .tls_config(tls)
                    .map_err(|e| invalid(format!("TLS to the control plane: {e}")))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(timeout)
                    // A replica whose host vanished sends no end of stream: pings find it, so
                    // the proxy moves on to another replica instead of waiting for TCP.
                    .http2_keep_alive_interval(CP_KEEPALIVE)
                    .keep_alive_timeout(CP_KEEPALIVE)
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                Ok((address.to_string(), channel))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if replicas.is_empty() {
            return Err(CpAddressError::Empty);
        }
        Ok(Self {
            replicas: replicas.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The replica in use: its index (for [`CpChannels::failed`]) and its channel.
    pub fn current(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Acquire) % self.replicas.len();
        (i, self.replicas[i].1.clone())
    }

    /// The address of replica `index`.
    pub fn address(&self, index: usize) -> &str {
        &self.replicas[index % self.replicas.len()].0
    }

    /// How many addresses there are.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Always false: there is at least one address.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// A call to replica `used` failed: the next call goes to the next replica. Several
    /// callers that saw the same replica fail move on once, not once each.
    pub fn failed(&self, used: usize) {
        let n = self.replicas.len();
        if n > 1
            && self
                .current
                .compare_exchange(used, (used + 1) % n, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::info!(
                failed = %self.replicas[used % n].0,
                next = %self.replicas[(used + 1) % n].0,
                "control-plane replica unreachable; trying the next one"
            );
        }
    }
}

impl From<Channel> for CpChannels {
    /// One replica, over an existing channel.
    fn from(channel: Channel) -> Self {
        Self {
            replicas: vec![(String::new(), channel)].into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failure_moves_on_to_the_next_replica_once() {
        let cp = CpChannels::new(
            " https://127.0.0.1:1, https://127.0.0.1:2,,https://127.0.0.1:3 ",
            b"",
            Duration::from_secs(1),
        )
        .expect("three addresses");
        assert_eq!(cp.len(), 3);
        assert_eq!(cp.current().0, 0);
        cp.failed(0);
        // A second caller that saw replica 0 fail too does not skip replica 1.
        cp.failed(0);
        assert_eq!(cp.current().0, 1);
        assert_eq!(cp.address(1), "https://127.0.0.1:2");
        cp.failed(1);
        cp.failed(2);
        assert_eq!(cp.current().0, 0, "round and back to the first");
    }

    #[tokio::test]
    async fn bad_addresses_are_named() {
        assert!(matches!(
            CpChannels::new(" , ", b"", Duration::from_secs(1)),
            Err(CpAddressError::Empty)
        ));
        let e = CpChannels::new("https://127.0.0.1:1,not a url", b"", Duration::from_secs(1))
            .expect_err("a bad address")
            .to_string();
        assert!(e.contains("not a url"), "{e}");
        // One address: failures change nothing.
        let one = CpChannels::new("https://127.0.0.1:1", b"", Duration::from_secs(1))
            .expect("one address");
        one.failed(0);
        assert_eq!(one.current().0, 0);
    }
}
