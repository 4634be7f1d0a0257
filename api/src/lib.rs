//! weft's shared API: what the control plane and the proxies agree on.
//!
//! - [`resources`]: the Kuma-compatible resource types (`Mesh`, `Dataplane`, the policies),
//!   their envelope and their universal JSON form.
//! - [`parse`]: reading YAML/JSON documents in universal or Kubernetes form, with errors that
//!   name the document, line and field; [`validate`] holds the per-resource rules it applies.
//! - [`duration`]: Kuma's duration spellings (`30s`, `24h`, `1d`).
//! - [`proto`]: the gRPC services between proxies and the control plane; [`parts`]: how a
//!   proxy completes a snapshot that keeps parts of the one before.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod duration;
pub mod parse;
pub mod parts;
pub mod proto;
pub mod resources;
pub mod validate;
mod yaml_lines;

pub use resources::{DataplaneSpec, MeshSpec, Resource, ResourceMeta, ResourceType, Spec};
pub use resources::{dataplane, mesh, policy};
