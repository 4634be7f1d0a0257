//! Discovery: proxies register over a bidirectional gRPC stream and receive versioned
//! snapshots of what they need, pushed when it changes.
//!
//! - [`view`]: one read of the store, shared by every stream, rebuilt on change.
//! - [`snapshot`]: one proxy's snapshot from its mesh's view (pure, hashed for its version).
pub mod snapshot;
pub mod view;
