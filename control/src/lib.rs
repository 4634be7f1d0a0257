//! weft's control plane and the client its CLI uses.
//!
//! - [`store`]: the [`store::Store`] contract and the embedded SQLite backend; versions give
//!   optimistic concurrency, and every write is one transaction.
//! - [`rest`]: the REST API over the store (Kuma's paths, JSON, loopback-only mutations).
//! - [`run`]: wiring for `weft-control run`: open the store, create `default`, serve.
//! - [`identity`]: per-mesh CAs, dataplane tokens, and the `Identity.Certify` service.
//! - [`discovery`]: the `Discovery.Stream` service and per-proxy snapshots.
//! - [`client`]: a small blocking REST client, the engine of `weftctl`; [`table`] and
//!   [`inspect`] render what it prints.
//!
//! A resource's life: `weftctl apply` parses and validates the file locally
//! ([`weft_api::parse`]), PUTs each document; [`rest`] parses and validates it again, checks
//! it against the path, and [`store`] writes it in a transaction that also checks its mesh.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod discovery;
pub mod identity;
pub mod inspect;
pub mod rest;
pub mod run;
pub mod store;
pub mod table;
