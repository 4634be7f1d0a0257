//! Discovery: proxies register over a bidirectional gRPC stream and receive versioned
//! snapshots of what they need, pushed when it changes.
//!
//! - [`view`]: one read of the store, shared by every stream, rebuilt on change.
//! - [`snapshot`]: one proxy's snapshot from its mesh's view (pure, hashed for its version).
//! - [`hub`]: who is connected, what each was sent and acknowledged; the view reloader.
//! - [`server`]: the `Discovery.Stream` gRPC service and the dataplane lifecycle.
//! - [`grpc`]: the service's tonic wiring, which sends snapshots as spliced bytes.
pub mod grpc;
pub mod hub;
pub mod server;
pub mod snapshot;
pub mod view;

pub use hub::{Hub, ProxyStatus, SentSnapshot, StatsReport};
pub use server::{DataplaneAuth, DiscoveryService};
pub use view::{NoTrust, TrustSource};
