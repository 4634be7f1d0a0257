//! The gRPC services between proxies and the control plane, generated from `api/proto/weft/v1`
//! by `build.rs` (protox + tonic-prost-build, no `protoc`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Package `weft.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/weft.v1.rs"));
}

pub use v1::*;
