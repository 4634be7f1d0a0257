//! One simulated proxy: a `Discovery.Stream` that registers a Dataplane with its token, then
//! ACKs every snapshot and reports each ACK (which benchmark round the snapshot reflects,
//! how many endpoints it lists, its size) to the coordinator.
//!
//! It reads only what the benchmark needs of a snapshot: [`SnapshotHeader`] decodes the same
//! bytes as `weft.v1.Snapshot` but keeps the outbound services as raw bytes. A real proxy
//! decodes everything, on its own machine; here a thousand of them share the control
//! plane's CPUs, and full decoding would make the generator the bottleneck.
//!
//! Like the real proxy, it keeps the parts a snapshot leaves out from the snapshot it
//! applied last, with the same [`parts::merge`] (`--complete-snapshots` turns that off).

use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use weft_api::parts::{self, Parted};
use weft_api::proto::discovery_request::Kind;
use weft_api::proto::{self as pb, DiscoveryRequest};

/// The source service that marks benchmark round `round` in the permissions of a snapshot.
pub fn round_marker(round: u32) -> String {
    format!("bench-round-{round}")
}

/// `weft.v1.Snapshot` with the bulky parts left undecoded (same field numbers).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotHeader {
    /// Hash of the content.
    #[prost(string, tag = "1")]
    pub version: String,
    /// Unique per push.
    #[prost(string, tag = "2")]
    pub nonce: String,
    /// `DataplaneIdentity`, undecoded.
    #[prost(bytes = "bytes", tag = "3")]
    pub dataplane: Bytes,
    /// `MeshSettings`, undecoded.
    #[prost(bytes = "bytes", tag = "4")]
    pub mesh: Bytes,
    /// The trust bundle.
    #[prost(string, tag = "5")]
    pub trust_bundle_pem: String,
    /// The inbounds, decoded: their permissions carry the round marker.
    #[prost(message, repeated, tag = "6")]
    pub inbounds: Vec<pb::InboundConfig>,
    /// `OutboundService`s, undecoded.
    #[prost(bytes = "bytes", repeated, tag = "7")]
    pub outbounds: Vec<Bytes>,
    /// `OutboundListener`s, undecoded.
    #[prost(bytes = "bytes", repeated, tag = "8")]
    pub outbound_listeners: Vec<Bytes>,
    /// The version of each part.
    #[prost(message, optional, tag = "9")]
    pub parts: Option<pb::SnapshotParts>,
    /// The parts left out, kept from the snapshot applied last.
    #[prost(enumeration = "pb::SnapshotPart", repeated, tag = "10")]
    pub kept: Vec<i32>,
}

/// Kept parts are filled in by the proxy's own [`parts::merge`]; only the copies are
/// cheaper here (reference counts of undecoded bytes).
impl Parted for SnapshotHeader {
    fn parts(&self) -> Option<&pb::SnapshotParts> {
        self.parts.as_ref()
    }

    fn kept(&self) -> &[i32] {
        &self.kept
    }

    fn clear_kept(&mut self) {
        self.kept.clear();
    }

    fn keep(&mut self, part: pb::SnapshotPart, from: &SnapshotHeader) {
        use pb::SnapshotPart as P;
        match part {
            P::Unspecified => {}
            P::Dataplane => self.dataplane.clone_from(&from.dataplane),
            P::Mesh => {
                self.mesh.clone_from(&from.mesh);
                self.trust_bundle_pem.clone_from(&from.trust_bundle_pem);
            }
            P::Inbounds => self.inbounds.clone_from(&from.inbounds),
            P::Outbounds => self.outbounds.clone_from(&from.outbounds),
            P::OutboundListeners => self.outbound_listeners.clone_from(&from.outbound_listeners),
        }
    }
}

/// `weft.v1.OutboundService` with only its endpoints, undecoded.
#[derive(Clone, PartialEq, prost::Message)]
struct OutboundHeader {
    #[prost(bytes = "bytes", repeated, tag = "3")]
    endpoints: Vec<Bytes>,
}

impl SnapshotHeader {
    /// The highest benchmark round whose marker the permissions carry (0: none).
    pub fn round(&self) -> u32 {
        self.inbounds
            .iter()
            .flat_map(|ib| &ib.permissions)
            .filter_map(|p| p.source_service.strip_prefix("bench-round-")?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// How many endpoints the outbound services list in all.
    pub fn endpoints(&self) -> usize {
        self.outbounds
            .iter()
            .map(|o| {
                <OutboundHeader as prost::Message>::decode(o.clone())
                    .map_or(0, |h| h.endpoints.len())
            })
            .sum()
    }
}

/// What a simulated proxy tells the coordinator.
#[derive(Debug)]
pub enum Event {
    /// It received a snapshot and queued its ACK.
    Acked {
        /// The proxy's index.
        proxy: usize,
        /// The benchmark round the snapshot reflects.
        round: u32,
        /// Endpoints listed.
        endpoints: usize,
        /// Encoded size of the snapshot as received (without the parts it kept).
        bytes: usize,
        /// When the ACK was queued.
        at: Instant,
    },
    /// Its stream failed or ended.
    Ended {
        /// The proxy's index.
        proxy: usize,
        /// Why.
        reason: String,
    },
}

/// One proxy's identity.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The proxy's index (0-based).
    pub index: usize,
    /// The Dataplane YAML it registers.
    pub dataplane: String,
    /// Its dataplane token.
    pub token: String,
    /// Whether it keeps unchanged parts (else it asks for complete snapshots).
    pub keep_parts: bool,
}

/// Opens an HTTP/2 connection (TLS, trusting `ca_pem`) that `streams` proxies share. Its
/// flow-control windows are sized as if each stream had a connection of its own, so one
/// proxy's snapshot never waits for another's window.
pub async fn connect(
    dp: std::net::SocketAddr,
    ca_pem: &str,
    streams: usize,
) -> anyhow::Result<Channel> {
    const STREAM_WINDOW: u32 = 1 << 20;
    let conn_window = u32::try_from(streams)
        .unwrap_or(u32::MAX)
        .saturating_mul(STREAM_WINDOW)
        .min(i32::MAX as u32);
    Ok(Endpoint::from_shared(format!("https://{dp}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))?
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(conn_window)
        .connect()
        .await?)
}

/// Runs one proxy until its stream ends; `permit` (the registration slot) is released once
/// the first snapshot arrives.
pub async fn run(
    channel: Channel,
    reg: Registration,
    permit: Option<OwnedSemaphorePermit>,
    events: mpsc::UnboundedSender<Event>,
) {
    let proxy = reg.index;
    let reason = match drive(channel, reg, permit, &events).await {
        Ok(()) => "the control plane closed the stream".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let _ = events.send(Event::Ended { proxy, reason });
}

async fn drive(
    channel: Channel,
    reg: Registration,
    mut permit: Option<OwnedSemaphorePermit>,
    events: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(pb::Register {
            dataplane: reg.dataplane,
            proxy_version: concat!("weft-bench/", env!("CARGO_PKG_VERSION")).into(),
            keeps_parts: if reg.keep_parts {
                parts::ALL.iter().map(|p| *p as i32).collect()
            } else {
                Vec::new()
            },
        })),
    })
    .await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {}", reg.token).parse()?);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<DiscoveryRequest, SnapshotHeader>::default();
    let path = PathAndQuery::from_static("/weft.v1.Discovery/Stream");
    let mut snapshots = grpc.streaming(req, path, codec).await?.into_inner();
    let mut applied: Option<SnapshotHeader> = None;
    while let Some(mut snap) = snapshots.message().await? {
        let bytes = prost::Message::encoded_len(&snap);
        if let Err(reason) = parts::merge(&mut snap, applied.as_ref()) {
            tx.send(DiscoveryRequest {
                kind: Some(Kind::Nack(pb::Nack {
                    version: snap.version,
                    nonce: snap.nonce,
                    reason,
                })),
            })
            .await?;
            continue;
        }
        let round = snap.round();
        let endpoints = snap.endpoints();
        tx.send(DiscoveryRequest {
            kind: Some(Kind::Ack(pb::Ack {
                version: snap.version.clone(),
                nonce: snap.nonce.clone(),
            })),
        })
        .await?;
        applied = Some(snap);
        let at = Instant::now();
        permit.take();
        let _ = events.send(Event::Acked {
            proxy: reg.index,
            round,
            endpoints,
            bytes,
            at,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn the_header_reads_a_full_snapshot() {
        let endpoint = |a: &str| pb::Endpoint {
            address: a.into(),
            port: 8080,
            healthy: true,
            ..Default::default()
        };
        let snap = pb::Snapshot {
            version: "v1".into(),
            nonce: "n1".into(),
            dataplane: Some(pb::DataplaneIdentity {
                mesh: "bench".into(),
                name: "dp-0".into(),
                ..Default::default()
            }),
            trust_bundle_pem: "PEM".into(),
            inbounds: vec![pb::InboundConfig {
                port: 8080,
                permissions: vec![
                    pb::PermissionRule {
                        source_service: round_marker(3),
                        ..Default::default()
                    },
                    pb::PermissionRule {
                        source_service: "*".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            outbounds: vec![
                pb::OutboundService {
                    service: "a".into(),
                    endpoints: vec![endpoint("10.0.0.1"), endpoint("10.0.0.2")],
                    ..Default::default()
                },
                pb::OutboundService {
                    service: "b".into(),
                    endpoints: vec![endpoint("10.0.0.3")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let bytes = snap.encode_to_vec();
        let header = SnapshotHeader::decode(bytes.as_slice()).unwrap();
        assert_eq!(header.version, "v1");
        assert_eq!(header.nonce, "n1");
        assert_eq!(header.round(), 3);
        assert_eq!(header.endpoints(), 3);
        assert_eq!(header.encoded_len(), bytes.len());
    }
}
