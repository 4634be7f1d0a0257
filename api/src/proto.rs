//! Generated protobuf messages and gRPC services of weft's proxy ↔ control-plane API
//! (package `weft.v1`, compiled from `api/proto/weft/v1/*.proto` by `build.rs`).
//!
//! `weft_api::proto::identity_client::IdentityClient` and
//! `weft_api::proto::identity_server::{Identity, IdentityServer}` are the entry points.

/// The `weft` protobuf package namespace.
pub mod weft {
    /// Package `weft.v1`.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("weft.v1");
    }
}

pub use weft::v1::*;
