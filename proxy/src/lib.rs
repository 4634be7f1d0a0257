//! weft-proxy: the sidecar data plane of the weft service mesh.
//!
//! The proxy takes its identity and configuration from the control plane and
//! carries the application's traffic over mesh mTLS. Identity and control:
//! - [`cp`]: the gRPC channels to the control plane's replicas, moving on to the next replica
//!   when one fails.
//! - [`identity`]: key generation, `Identity.Certify`, renewal; the current
//!   certificate lives in a lock-free [`identity::CertHandle`].
//! - [`tls`]: rustls client/server configs for mesh mTLS (TLS 1.3, SPIFFE checks).
//! - [`admin`]: the loopback admin endpoint (`/live`, `/ready`, `/certs`, `/metrics`).
//! - [`metrics`]: the Prometheus registry and every metric.
//! - [`telemetry`]: what the data path reports per request and connection — request metrics
//!   (`weft_requests_total`, `weft_request_duration_seconds`, updated without locks or
//!   allocation), traces (W3C `traceparent`, B3 for zipkin; OTLP/gRPC or Zipkin v2 export),
//!   access logs (JSON lines to a file or TCP), `process_*`, and the mesh's Prometheus
//!   endpoint (default `:5670/metrics`). Configured from each snapshot's mesh settings;
//!   exporters sit behind bounded queues, so they never slow traffic. The data path reaches
//!   the shared handle as `config.telemetry`.
//!
//! # The life of a connection
//!
//! 1. The app connects somewhere. With transparent proxying, iptables redirects the
//!    connection to the outbound listener (`redirectPortOutbound`, 15001); in explicit mode the
//!    app connects to a `networking.outbound[]` listener. Listeners are bound and kept in step
//!    with the config by [`datapath::DataPath`], with the socket details in [`listen`].
//! 2. [`outbound`] reads the original destination (`SO_ORIGINAL_DST`). A mesh destination
//!    takes the mesh path; anything else is passed through or closed, per the mesh.
//! 3. On the mesh path, [`detect`] sniffs HTTP/1.x or the HTTP/2 preface (100 ms at most). An
//!    endpoint is chosen from [`config`], and the traffic goes over a pooled, multiplexed mesh
//!    mTLS connection to it ([`http::pool`]), with configs from a [`mesh_tls::MeshTls`]
//!    provider: TLS 1.3, ALPN naming the mesh transport, the server's SPIFFE identity checked.
//!    HTTP travels request by request ([`http`]); anything else as one HTTP/2 CONNECT stream
//!    per app connection ([`http::opaque`]). With mTLS off, opaque TCP is plain TCP.
//! 4. On the server's host, [`inbound`] terminates mesh mTLS (redirected to
//!    `redirectPortInbound`, 15006, or on the inbound's own port in explicit mode), reads the
//!    client's SPIFFE identity, applies the inbound's permissions and forwards to the app.
//! 5. Opaque bytes are moved with [`copy`]: buffers taken only while data flows, half-close
//!    carried through.
//!
//! A new config ([`config::ProxyConfig`], from a discovery snapshot) or certificate applies
//! to new connections; established ones keep what they started with. [`drain`] stops the
//! listeners on SIGTERM and lets connections finish within the drain window. The counters are
//! in [`datapath_metrics`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod copy;
pub mod cp;
pub mod datapath;
pub mod datapath_metrics;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod listen;
pub mod mesh_tls;
pub mod metrics;
pub mod outbound;
pub mod route;
pub mod run;
pub mod telemetry;
pub mod tls;

pub use config::{ConfigError, ProxyConfig};
pub use datapath::{DataPath, DataPathOptions};

/// Errors of the data path.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    /// The snapshot cannot be applied.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({kind:?}): {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The listener's kind.
        kind: config::ListenerKind,
        /// Why.
        source: std::io::Error,
    },
    /// A lock was poisoned by a panic elsewhere.
    #[error("the data path's listener table is poisoned")]
    Poisoned,
}
