//! A snapshot as the bytes that go on the wire, assembled from parts.
//!
//! Protobuf encodes a message as its fields one after the other, so a `Snapshot` is the
//! concatenation of its fields' encodings, and a repeated field is the concatenation of its
//! entries. The parts every proxy of a mesh shares (mesh settings and trust bundle; the
//! outbound services with their endpoints) are encoded and hashed once per view and shared
//! as [`Bytes`]; only a proxy's own fields (its identity, inbounds and listeners) are
//! encoded per proxy. Fields are laid out in tag order, as prost lays them out, so the
//! result is byte for byte what encoding the whole [`pb::Snapshot`] gives.
//!
//! Each of the five parts of the content ([`weft_api::parts::ALL`]) has its own hash, sent
//! as its version; the snapshot's version is a hash of those. A push may leave out parts the
//! proxy already holds at the same version ([`EncodedSnapshot::keep`]): those bytes are
//! simply not written, and field 10 names them.

use bytes::{BufMut, Bytes};
use prost::encoding::{self, WireType};
use std::fmt;
use weft_api::parts;
use weft_api::proto as pb;

/// Field numbers of `Snapshot` and `OutboundService` (`api/proto/weft/v1/discovery.proto`).
mod tag {
    pub const VERSION: u32 = 1;
    pub const NONCE: u32 = 2;
    pub const DATAPLANE: u32 = 3;
    pub const MESH: u32 = 4;
    pub const TRUST_BUNDLE_PEM: u32 = 5;
    pub const INBOUNDS: u32 = 6;
    pub const OUTBOUNDS: u32 = 7;
    pub const OUTBOUND_LISTENERS: u32 = 8;
    pub const PARTS: u32 = 9;
    pub const KEPT: u32 = 10;
    /// `OutboundService` fields.
    pub const SERVICE: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const ENDPOINTS: u32 = 3;
    pub const LOAD_BALANCER: u32 = 4;
    pub const HTTP_RULES: u32 = 5;
    pub const DEFAULT_ROUTE: u32 = 6;
}

/// Encoded bytes and their hash, both computed once.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Hashed {
    /// The bytes.
    pub bytes: Bytes,
    /// [`hash`] of the bytes.
    pub hash: u64,
}

impl Hashed {
    /// Hashes `bytes` and keeps both.
    pub fn new(bytes: Vec<u8>) -> Hashed {
        let hash = hash(&bytes);
        Hashed {
            bytes: bytes.into(),
            hash,
        }
    }
}

impl fmt::Debug for Hashed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hashed({} bytes, {:016x})", self.bytes.len(), self.hash)
    }
}

/// One proxy's snapshot, encoded: its own fields, and the mesh's shared parts by reference.
///
/// Cloning is cheap (reference counts). [`EncodedSnapshot::encode`] writes what prost would
/// write for the equivalent [`pb::Snapshot`]. Its content is made of the five
/// [`parts::ALL`], each hashed on its own; [`EncodedSnapshot::keep`] leaves parts out of
/// the push (the proxy keeps its copy), which changes the bytes but not the version.
#[derive(Clone, Debug)]
pub struct EncodedSnapshot {
    version: String,
    nonce: String,
    /// Fields 3 (dataplane), 6 (inbounds) and 8 (outbound listeners): this proxy's own.
    own: Bytes,
    /// Where field 6 and field 8 begin in `own`.
    split: (usize, usize),
    /// Fields 4 (mesh) and 5 (trust bundle), shared by the mesh.
    mesh: Hashed,
    /// Field 7 (outbound services), shared by the proxies routed alike.
    outbounds: Hashed,
    /// The hash of each part, in [`parts::ALL`] order.
    hashes: PartHashes,
    /// The parts left out of this push: bit `i` is `parts::ALL[i]`.
    kept: u8,
    /// Fields 9 (part versions) and 10 (kept parts), encoded.
    tail: Vec<u8>,
}

/// The hash of each part of a snapshot, in [`parts::ALL`] order.
pub type PartHashes = [u64; 5];

impl EncodedSnapshot {
    /// Assembles a snapshot from a proxy's own fields and the shared parts; its version is
    /// computed from the parts' hashes.
    pub fn new(
        dataplane: &pb::DataplaneIdentity,
        inbounds: &[pb::InboundConfig],
        listeners: &[pb::OutboundListener],
        mesh: Hashed,
        outbounds: Hashed,
    ) -> EncodedSnapshot {
        let mut own = Vec::with_capacity(
            encoding::message::encoded_len(tag::DATAPLANE, dataplane)
                + encoding::message::encoded_len_repeated(tag::INBOUNDS, inbounds)
                + encoding::message::encoded_len_repeated(tag::OUTBOUND_LISTENERS, listeners),
        );
        encoding::message::encode(tag::DATAPLANE, dataplane, &mut own);
        let a = own.len();
        encoding::message::encode_repeated(tag::INBOUNDS, inbounds, &mut own);
        let b = own.len();
        encoding::message::encode_repeated(tag::OUTBOUND_LISTENERS, listeners, &mut own);
        let hashes = [
            hash(&own[..a]),
            mesh.hash,
            hash(&own[a..b]),
            outbounds.hash,
            hash(&own[b..]),
        ];
        let mut snap = EncodedSnapshot {
            version: version(&hashes),
            nonce: String::new(),
            own: own.into(),
            split: (a, b),
            mesh,
            outbounds,
            hashes,
            kept: 0,
            tail: Vec::new(),
        };
        snap.keep(|_| false);
        snap
    }

    /// The content's version: equal versions mean equal content.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The hash of each part.
    pub fn part_hashes(&self) -> &PartHashes {
        &self.hashes
    }

    /// Leaves out of the push the parts for which `keep` is true: the proxy takes them from
    /// the snapshot it applied last.
    pub fn keep(&mut self, keep: impl Fn(pb::SnapshotPart) -> bool) {
        self.kept = 0;
        let mut kept = Vec::new();
        for (i, part) in parts::ALL.into_iter().enumerate() {
            if keep(part) {
                self.kept |= 1 << i;
                kept.push(part as i32);
            }
        }
        self.tail.clear();
        encoding::message::encode(tag::PARTS, &part_versions(&self.hashes), &mut self.tail);
        encoding::int32::encode_packed(tag::KEPT, &kept, &mut self.tail);
    }

    /// The parts left out of this push.
    pub fn kept(&self) -> impl Iterator<Item = pb::SnapshotPart> + '_ {
        (0..parts::ALL.len())
            .filter(|i| self.kept & (1 << i) != 0)
            .map(|i| parts::ALL[i])
    }

    /// The nonce it is sent with (empty until set).
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Sets the nonce of this push.
    pub fn set_nonce(&mut self, nonce: String) {
        self.nonce = nonce;
    }

    /// The parts after version and nonce, in tag order; those left out are empty.
    fn parts(&self) -> [Bytes; 5] {
        let (a, b) = self.split;
        let mut parts = [
            self.own.slice(..a),
            self.mesh.bytes.clone(),
            self.own.slice(a..b),
            self.outbounds.bytes.clone(),
            self.own.slice(b..),
        ];
        for (i, part) in parts.iter_mut().enumerate() {
            if self.kept & (1 << i) != 0 {
                *part = Bytes::new();
            }
        }
        parts
    }

    /// The length of [`EncodedSnapshot::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        self.head_len() + self.parts().iter().map(Bytes::len).sum::<usize>() + self.tail.len()
    }

    /// The length of version and nonce.
    fn head_len(&self) -> usize {
        string_len(tag::VERSION, &self.version) + string_len(tag::NONCE, &self.nonce)
    }

    /// Writes the snapshot's protobuf encoding (no length prefix).
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_string(tag::VERSION, &self.version, buf);
        put_string(tag::NONCE, &self.nonce, buf);
        for part in self.parts() {
            buf.put_slice(&part);
        }
        buf.put_slice(&self.tail);
    }

    /// Appends `prefix` and the encoding to `out` as chunks without copying the shared parts:
    /// `prefix`, version, nonce and the proxy's identity in a new first chunk, then the parts
    /// as references (empty ones left out), then the part versions.
    pub fn chunks(&self, prefix: &[u8], out: &mut impl Extend<Bytes>) {
        let [identity, rest @ ..] = self.parts();
        let mut first = Vec::with_capacity(prefix.len() + self.head_len() + identity.len());
        first.extend_from_slice(prefix);
        put_string(tag::VERSION, &self.version, &mut first);
        put_string(tag::NONCE, &self.nonce, &mut first);
        first.extend_from_slice(&identity);
        out.extend(std::iter::once(Bytes::from(first)));
        out.extend(rest.into_iter().filter(|p| !p.is_empty()));
        out.extend(std::iter::once(Bytes::copy_from_slice(&self.tail)));
    }

    /// The encoding as one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }
}

/// The version of a snapshot whose parts hash to `hashes`.
fn version(hashes: &PartHashes) -> String {
    let mut words = [0u8; 40];
    for (slot, h) in words.chunks_exact_mut(8).zip(hashes) {
        slot.copy_from_slice(&h.to_le_bytes());
    }
    format!("{:016x}", hash(&words))
}

/// The `parts` field of a snapshot whose parts hash to `hashes`.
fn part_versions(hashes: &PartHashes) -> pb::SnapshotParts {
    let [dataplane, mesh, inbounds, outbounds, outbound_listeners] =
        hashes.map(|h| format!("{h:016x}"));
    pb::SnapshotParts {
        dataplane,
        mesh,
        inbounds,
        outbounds,
        outbound_listeners,
    }
}

/// Sets `version` and `parts` of a complete snapshot to what [`EncodedSnapshot::new`] gives
/// the same content (`nonce` and `kept` are left alone).
pub fn seal(snap: &mut pb::Snapshot) {
    let mut fields = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    if let Some(d) = &snap.dataplane {
        encoding::message::encode(tag::DATAPLANE, d, &mut fields[0]);
    }
    fields[1] = encode_mesh(snap.mesh.as_ref(), &snap.trust_bundle_pem);
    encoding::message::encode_repeated(tag::INBOUNDS, &snap.inbounds, &mut fields[2]);
    encoding::message::encode_repeated(tag::OUTBOUNDS, &snap.outbounds, &mut fields[3]);
    encoding::message::encode_repeated(
        tag::OUTBOUND_LISTENERS,
        &snap.outbound_listeners,
        &mut fields[4],
    );
    let hashes = fields.map(|f| hash(&f));
    snap.version = version(&hashes);
    snap.parts = Some(part_versions(&hashes));
}

/// The version [`EncodedSnapshot::new`] gives the same content, computed from a complete
/// snapshot (its own `version`, `nonce`, `parts` and `kept` are ignored).
pub fn content_version(snap: &pb::Snapshot) -> String {
    let mut sealed = snap.clone();
    seal(&mut sealed);
    sealed.version
}

/// Fields 4 and 5 of a snapshot: the mesh settings and the trust bundle.
pub fn encode_mesh(settings: Option<&pb::MeshSettings>, trust_bundle_pem: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(s) = settings {
        encoding::message::encode(tag::MESH, s, &mut out);
    }
    put_string(tag::TRUST_BUNDLE_PEM, trust_bundle_pem, &mut out);
    out
}

/// The `endpoints` field entries of an `OutboundService`.
pub fn encode_endpoints(endpoints: &[pb::Endpoint]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoding::message::encoded_len_repeated(
        tag::ENDPOINTS,
        endpoints,
    ));
    encoding::message::encode_repeated(tag::ENDPOINTS, endpoints, &mut out);
    out
}

/// Appends one `outbounds` entry of a snapshot: `service` (whose own `endpoints` must be
/// empty) with `endpoints` (from [`encode_endpoints`]) spliced in at their place, between
/// fields 1-2 and 4-6, where prost writes them.
pub fn encode_outbound(service: &pb::OutboundService, endpoints: &[u8], out: &mut Vec<u8>) {
    use encoding::message;
    debug_assert!(service.endpoints.is_empty());
    let lb = service.load_balancer.as_ref();
    let len = string_len(tag::SERVICE, &service.service)
        + string_len(tag::PROTOCOL, &service.protocol)
        + endpoints.len()
        + lb.map_or(0, |lb| message::encoded_len(tag::LOAD_BALANCER, lb))
        + message::encoded_len_repeated(tag::HTTP_RULES, &service.http_rules)
        + message::encoded_len_repeated(tag::DEFAULT_ROUTE, &service.default_route);
    out.reserve(len + 8);
    encoding::encode_key(tag::OUTBOUNDS, WireType::LengthDelimited, out);
    encoding::encode_varint(len as u64, out);
    put_string(tag::SERVICE, &service.service, out);
    put_string(tag::PROTOCOL, &service.protocol, out);
    out.extend_from_slice(endpoints);
    if let Some(lb) = lb {
        message::encode(tag::LOAD_BALANCER, lb, out);
    }
    message::encode_repeated(tag::HTTP_RULES, &service.http_rules, out);
    message::encode_repeated(tag::DEFAULT_ROUTE, &service.default_route, out);
}

fn string_len(tag: u32, v: &str) -> usize {
    if v.is_empty() {
        0
    } else {
        encoding::key_len(tag) + encoding::encoded_len_varint(v.len() as u64) + v.len()
    }
}

/// Writes a proto3 string field (nothing when empty, as prost does).
fn put_string(tag: u32, v: &str, buf: &mut impl BufMut) {
    if !v.is_empty() {
        encoding::encode_key(tag, WireType::LengthDelimited, buf);
        encoding::encode_varint(v.len() as u64, buf);
        buf.put_slice(v.as_bytes());
    }
}

/// FNV-1a over 8-byte words with a shift folded in after each multiply (so high bits reach
/// the low ones): a few cycles per word where byte-wise FNV took a few per byte.
pub fn hash(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(PRIME);
        h ^= h >> 29;
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h ^= h >> 32;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn endpoint(address: &str) -> pb::Endpoint {
        let mut tags = std::collections::BTreeMap::new();
        tags.insert("kuma.io/service".to_string(), "backend".to_string());
        pb::Endpoint {
            address: address.into(),
            port: 8080,
            tags,
            healthy: true,
            dataplane: format!("dp-{address}"),
        }
    }

    fn sample() -> pb::Snapshot {
        pb::Snapshot {
            version: String::new(),
            nonce: String::new(),
            dataplane: Some(pb::DataplaneIdentity {
                mesh: "m".into(),
                name: "web-1".into(),
                address: "10.0.0.1".into(),
                ..Default::default()
            }),
            mesh: Some(pb::MeshSettings {
                name: "m".into(),
                passthrough: true,
                ..Default::default()
            }),
            trust_bundle_pem: "PEM".into(),
            inbounds: vec![pb::InboundConfig {
                port: 8080,
                service: "web".into(),
                permissions: vec![pb::PermissionRule {
                    source_service: "*".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            outbounds: vec![
                pb::OutboundService {
                    service: "backend".into(),
                    protocol: "http".into(),
                    endpoints: vec![endpoint("10.0.0.2"), endpoint("10.0.0.3")],
                    load_balancer: Some(pb::LoadBalancer::default()),
                    http_rules: vec![pb::HttpRule {
                        origin: "MeshHTTPRoute/r".into(),
                        ..Default::default()
                    }],
                    default_route: vec![pb::WeightedDestination {
                        weight: 1,
                        tags: Default::default(),
                    }],
                },
                pb::OutboundService {
                    service: "empty".into(),
                    ..Default::default()
                },
            ],
            outbound_listeners: vec![pb::OutboundListener {
                address: "127.0.0.1".into(),
                port: 10001,
                service: "backend".into(),
            }],
            parts: None,
            kept: vec![],
        }
    }

    /// Encodes `snap` the way the discovery service does: shared parts apart, spliced.
    fn assemble(snap: &pb::Snapshot) -> EncodedSnapshot {
        let mesh = Hashed::new(encode_mesh(snap.mesh.as_ref(), &snap.trust_bundle_pem));
        let mut outbounds = Vec::new();
        for o in &snap.outbounds {
            let bare = pb::OutboundService {
                endpoints: vec![],
                ..o.clone()
            };
            encode_outbound(&bare, &encode_endpoints(&o.endpoints), &mut outbounds);
        }
        let dp = snap.dataplane.clone().unwrap_or_default();
        EncodedSnapshot::new(
            &dp,
            &snap.inbounds,
            &snap.outbound_listeners,
            mesh,
            Hashed::new(outbounds),
        )
    }

    #[test]
    fn spliced_parts_encode_exactly_as_prost() {
        let mut snap = sample();
        let mut encoded = assemble(&snap);
        encoded.set_nonce("1f".into());
        seal(&mut snap);
        assert_eq!(snap.version, encoded.version());
        snap.nonce = "1f".into();
        let bytes = encoded.to_vec();
        assert_eq!(bytes, snap.encode_to_vec());
        assert_eq!(bytes.len(), encoded.encoded_len());
        assert_eq!(pb::Snapshot::decode(bytes.as_slice()).ok(), Some(snap));
        let mut chunks: Vec<Bytes> = Vec::new();
        encoded.chunks(b"frame", &mut chunks);
        assert_eq!(chunks.concat(), [b"frame".as_slice(), &bytes].concat());
        assert_eq!(
            chunks[3].as_ptr(),
            encoded.outbounds.bytes.as_ptr(),
            "the outbounds are shared, not copied"
        );
    }

    #[test]
    fn a_push_that_keeps_parts_leaves_them_out_and_merges_back() {
        let mut full = sample();
        seal(&mut full);
        let mut encoded = assemble(&full);
        encoded.keep(|p| p == pb::SnapshotPart::Outbounds || p == pb::SnapshotPart::Mesh);
        assert_eq!(
            encoded.version(),
            full.version,
            "same content, same version"
        );
        let bytes = encoded.to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        let mut chunks: Vec<Bytes> = Vec::new();
        encoded.chunks(b"", &mut chunks);
        assert_eq!(chunks.concat(), bytes);
        let mut sent = pb::Snapshot::decode(bytes.as_slice()).expect("decodes");
        assert!(
            sent.outbounds.is_empty() && sent.mesh.is_none() && sent.trust_bundle_pem.is_empty()
        );
        assert_eq!(
            sent.kept,
            vec![
                pb::SnapshotPart::Mesh as i32,
                pb::SnapshotPart::Outbounds as i32
            ]
        );
        assert_eq!(sent.parts, full.parts);
        assert_eq!(sent.inbounds, full.inbounds);
        weft_api::parts::merge(&mut sent, Some(&full)).expect("merges");
        assert_eq!(sent, full);
        encoded.keep(|_| false);
        assert_eq!(encoded.to_vec(), full.encode_to_vec(), "complete again");
    }

    #[test]
    fn the_version_hashes_content_only() {
        let bare = sample();
        let mut sent = sample();
        sent.version = content_version(&bare);
        sent.nonce = "1f".into();
        assert_eq!(content_version(&sent), content_version(&bare));
        assert_eq!(assemble(&bare).version(), content_version(&bare));
        let mut other = sample();
        other.outbounds[0].endpoints[0].healthy = false;
        assert_ne!(content_version(&other), content_version(&bare));
        assert_ne!(assemble(&other).version(), assemble(&bare).version());
        let mut other = sample();
        other.inbounds[0].permissions.clear();
        assert_ne!(assemble(&other).version(), assemble(&bare).version());
        let mut other = sample();
        other.trust_bundle_pem = "OTHER".into();
        assert_ne!(assemble(&other).version(), assemble(&bare).version());
    }

    #[test]
    fn the_hash_sees_every_byte() {
        let base = vec![7u8; 21];
        let h = hash(&base);
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] ^= 0x80;
            assert_ne!(hash(&v), h, "byte {i}");
        }
        assert_ne!(hash(&base[..20]), h);
    }
}
