//! Builds one proxy's snapshot from its mesh's [`MeshView`]: the mesh settings, its inbounds
//! with the permissions that apply to each, every service of the mesh with its endpoints, and
//! routes resolved for this proxy as the source. Pure: same inputs, same bytes, same version.

use super::view::MeshView;
use prost::Message;
use std::collections::BTreeMap;
use weft_api::DataplaneSpec;
use weft_api::dataplane::{PROTOCOL_TAG, SERVICE_TAG};
use weft_api::duration::parse_duration;
use weft_api::mesh::{CaBackendType, LoggingBackendType, MtlsMode, TracingBackendType};
use weft_api::policy::{
    Action, HeaderMatchType, HttpFilterType, PathMatchType, Selector, Tags, TargetKind, TargetRef,
};
use weft_api::proto::{self as pb, mtls::Mode, permission_rule, string_match};

/// Default lifetime of a proxy certificate (Kuma's code default).
pub const DEFAULT_CERT_LIFETIME_SECS: u64 = 24 * 3600;

/// Builds the snapshot of dataplane `name` in `mesh`; `version` is the hash of the content.
pub fn build(mesh: &str, name: &str, dp: &DataplaneSpec, view: &MeshView) -> pb::Snapshot {
    let tp = dp.networking.transparent_proxying.as_ref();
    let mut snap = pb::Snapshot {
        version: String::new(),
        nonce: String::new(),
        dataplane: Some(pb::DataplaneIdentity {
            mesh: mesh.into(),
            name: name.into(),
            address: dp.networking.address.clone(),
            redirect_port_inbound: tp
                .map(|t| t.redirect_port_inbound.unwrap_or(15006))
                .unwrap_or(0),
            redirect_port_outbound: tp
                .map(|t| t.redirect_port_outbound.unwrap_or(15001))
                .unwrap_or(0),
        }),
        mesh: Some(mesh_settings(mesh, view)),
        trust_bundle_pem: view.trust_bundle_pem.clone(),
        inbounds: dp
            .networking
            .inbound
            .iter()
            .map(|ib| pb::InboundConfig {
                port: ib.port,
                service_address: ib.app_address().to_string(),
                service_port: ib.app_port(),
                service: ib.service().to_string(),
                protocol: ib.tags.get(PROTOCOL_TAG).cloned().unwrap_or_default(),
                tags: ib.tags.clone(),
                permissions: permissions(name, &ib.tags, view),
            })
            .collect(),
        outbounds: outbounds(name, dp, view),
        outbound_listeners: dp
            .networking
            .outbound
            .iter()
            .map(|ob| pb::OutboundListener {
                address: ob.address.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port: ob.port,
                service: ob.tags.get(SERVICE_TAG).cloned().unwrap_or_default(),
            })
            .collect(),
    };
    snap.version = content_version(&snap);
    snap
}

/// A stable 64-bit hash of the snapshot's encoding without version and nonce.
///
/// Fields encode in tag order, so version (1) and nonce (2) lead the encoding and are cut
/// off its front: no copy of the snapshot, which lists every endpoint of the mesh.
pub fn content_version(snap: &pb::Snapshot) -> String {
    let bytes = snap.encode_to_vec();
    let field = |tag: u32, v: &String| {
        if v.is_empty() {
            0
        } else {
            prost::encoding::string::encoded_len(tag, v)
        }
    };
    let skip = field(1, &snap.version) + field(2, &snap.nonce);
    format!("{:016x}", hash(&bytes[skip..]))
}

/// FNV-1a over 8-byte words with a shift folded in after each multiply (so high bits reach
/// the low ones): a few cycles per word where byte-wise FNV took a few per byte, which at
/// 1,000 endpoints a snapshot and 1,000 proxies was a tenth of a second per change.
fn hash(bytes: &[u8]) -> u64 {
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

fn mesh_settings(mesh: &str, view: &MeshView) -> pb::MeshSettings {
    let spec = &view.spec;
    let mtls = match spec.enabled_mtls_backend() {
        Some(b) => pb::Mtls {
            enabled: true,
            backend: b.name.clone(),
            backend_type: match b.kind {
                CaBackendType::Builtin => "builtin",
                CaBackendType::Provided => "provided",
            }
            .into(),
            mode: match b.mode() {
                MtlsMode::Strict => Mode::Strict,
                MtlsMode::Permissive => Mode::Permissive,
            } as i32,
            cert_lifetime_seconds: b
                .dp_cert
                .as_ref()
                .and_then(|d| d.rotation.as_ref())
                .and_then(|r| r.expiration.as_deref())
                .and_then(|e| parse_duration(e).ok())
                .map(|d| d.as_secs())
                .unwrap_or(DEFAULT_CERT_LIFETIME_SECS),
        },
        None => pb::Mtls::default(),
    };
    let metrics = spec.metrics.as_ref().and_then(|m| {
        let name = m.enabled_backend.as_deref().filter(|n| !n.is_empty())?;
        let b = m.backends.iter().find(|b| b.name == name)?;
        let conf = b.conf.clone().unwrap_or_default();
        Some(pb::MetricsBackend {
            enabled: true,
            name: name.into(),
            port: conf.port.unwrap_or(5670),
            path: conf.path.unwrap_or_else(|| "/metrics".into()),
            skip_mtls: conf.skip_mtls.unwrap_or(false),
        })
    });
    let tracing = spec.tracing.as_ref().and_then(|t| {
        let b = match t.default_backend.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => t.backends.iter().find(|b| b.name == name)?,
            None => t.backends.first()?,
        };
        let conf = b.conf.clone().unwrap_or_default();
        let (kind, endpoint) = match b.kind {
            TracingBackendType::Zipkin => ("zipkin", conf.url),
            TracingBackendType::Opentelemetry => ("opentelemetry", conf.endpoint),
        };
        Some(pb::TracingBackend {
            enabled: true,
            name: b.name.clone(),
            backend_type: kind.into(),
            endpoint: endpoint.unwrap_or_default(),
            sampling: b.sampling.unwrap_or(100.0),
        })
    });
    let logging = spec.logging.as_ref().and_then(|l| {
        let b = match l.default_backend.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => l.backends.iter().find(|b| b.name == name)?,
            None => l.backends.first()?,
        };
        let conf = b.conf.clone().unwrap_or_default();
        let (kind, dest) = match b.kind {
            LoggingBackendType::File => ("file", conf.path),
            LoggingBackendType::Tcp => ("tcp", conf.address),
        };
        Some(pb::LoggingBackend {
            enabled: true,
            name: b.name.clone(),
            backend_type: kind.into(),
            destination: dest.unwrap_or_default(),
        })
    });
    pb::MeshSettings {
        name: mesh.into(),
        mtls: Some(mtls),
        passthrough: spec.passthrough(),
        metrics,
        tracing,
        logging,
    }
}

/// How specific a targetRef kind is; more specific policies and entries win.
fn specificity(kind: TargetKind) -> u8 {
    match kind {
        TargetKind::Mesh => 0,
        TargetKind::MeshSubset => 1,
        TargetKind::MeshService => 2,
        TargetKind::MeshServiceSubset => 3,
        TargetKind::Dataplane => 4,
        TargetKind::MeshHttpRoute => 5,
    }
}

fn tags_subset(want: &Tags, have: &Tags) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Whether a top-level targetRef selects a proxy (named `dp_name`) through these inbound tags.
fn target_selects(t: &TargetRef, dp_name: &str, tags: &Tags) -> bool {
    let service = tags.get(SERVICE_TAG).map(String::as_str);
    match t.kind {
        TargetKind::Mesh => true,
        TargetKind::MeshSubset => tags_subset(&t.tags, tags),
        TargetKind::MeshService => t.name.as_deref() == service,
        TargetKind::MeshServiceSubset => t.name.as_deref() == service && tags_subset(&t.tags, tags),
        TargetKind::Dataplane => t.name.as_deref() == Some(dp_name),
        TargetKind::MeshHttpRoute => false,
    }
}

/// The source service a `from` targetRef names: `*` for the whole mesh, `None` when it selects
/// by tags other than the service (a source's identity carries only its service).
fn source_of(t: &TargetRef) -> Option<String> {
    match t.kind {
        TargetKind::Mesh => Some("*".into()),
        TargetKind::MeshService => t.name.clone(),
        TargetKind::MeshSubset | TargetKind::MeshServiceSubset => {
            let service = t.name.clone().or_else(|| t.tags.get(SERVICE_TAG).cloned());
            let only_service = t.tags.keys().all(|k| k == SERVICE_TAG);
            if only_service {
                service.or(Some("*".into()))
            } else {
                None
            }
        }
        TargetKind::Dataplane | TargetKind::MeshHttpRoute => None,
    }
}

/// The ordered permission rules of one inbound: MeshTrafficPermission entries, most specific
/// first (by the `from` entry, then the policy's own targetRef), then legacy TrafficPermission
/// allows. The proxy applies the first rule whose source matches.
fn permissions(dp_name: &str, tags: &Tags, view: &MeshView) -> Vec<pb::PermissionRule> {
    let mut ranked: Vec<((u8, u8, String, usize), pb::PermissionRule)> = Vec::new();
    for (policy, mtp) in &view.mesh_traffic_permissions {
        if !target_selects(&mtp.target_ref, dp_name, tags) {
            continue;
        }
        for (i, from) in mtp.from.iter().enumerate() {
            let Some(source) = source_of(&from.target_ref) else {
                continue;
            };
            let action = match from.default.action {
                Action::Allow => permission_rule::Action::Allow,
                Action::Deny => permission_rule::Action::Deny,
                Action::AllowWithShadowDeny => permission_rule::Action::AllowWithShadowDeny,
            };
            let rule = pb::PermissionRule {
                source_service: source,
                action: action as i32,
                origin: format!("MeshTrafficPermission/{policy}"),
            };
            // Sort descending by specificity: store the complement.
            let key = (
                u8::MAX - specificity(from.target_ref.kind),
                u8::MAX - specificity(mtp.target_ref.kind),
                policy.clone(),
                i,
            );
            ranked.push((key, rule));
        }
    }
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rules: Vec<pb::PermissionRule> = ranked.into_iter().map(|(_, r)| r).collect();
    for (policy, tp) in &view.traffic_permissions {
        if !tp.destinations.iter().any(|d| d.matches(tags)) {
            continue;
        }
        for src in &tp.sources {
            let Some(service) = src.tags.get(SERVICE_TAG) else {
                continue;
            };
            if src.tags.keys().any(|k| k != SERVICE_TAG) {
                // Sources are identified by service only; a tag-narrowed selector cannot match.
                continue;
            }
            rules.push(pb::PermissionRule {
                source_service: service.clone(),
                action: permission_rule::Action::Allow as i32,
                origin: format!("TrafficPermission/{policy}"),
            });
        }
    }
    rules
}

/// Every service of the mesh, with endpoints and the routes this proxy uses to reach it.
fn outbounds(dp_name: &str, dp: &DataplaneSpec, view: &MeshView) -> Vec<pb::OutboundService> {
    let mut services: BTreeMap<String, Vec<pb::Endpoint>> = BTreeMap::new();
    for (name, other) in &view.dataplanes {
        for ib in &other.networking.inbound {
            services
                .entry(ib.service().to_string())
                .or_default()
                .push(pb::Endpoint {
                    address: ib
                        .address
                        .clone()
                        .unwrap_or_else(|| other.networking.address.clone()),
                    port: ib.port,
                    tags: ib.tags.clone(),
                    healthy: !view.offline.contains(name),
                    dataplane: name.clone(),
                });
        }
    }
    let own_tags: Vec<&Tags> = dp.networking.inbound.iter().map(|ib| &ib.tags).collect();
    services
        .into_iter()
        .map(|(service, endpoints)| {
            let protocol = common_protocol(&endpoints);
            let mut out = pb::OutboundService {
                service: service.clone(),
                protocol,
                endpoints,
                load_balancer: Some(pb::LoadBalancer::default()),
                http_rules: mesh_http_route_rules(dp_name, &own_tags, &service, view),
                default_route: vec![destination(1, &service, &Tags::new())],
            };
            apply_traffic_route(&mut out, &own_tags, view);
            out
        })
        .collect()
}

fn common_protocol(endpoints: &[pb::Endpoint]) -> String {
    let mut protocols = endpoints
        .iter()
        .map(|e| e.tags.get(PROTOCOL_TAG).cloned().unwrap_or_default());
    let first = protocols.next().unwrap_or_default();
    if protocols.all(|p| p == first) {
        first
    } else {
        "tcp".into()
    }
}

fn destination(weight: u32, service: &str, tags: &Tags) -> pb::WeightedDestination {
    let mut t = tags.clone();
    t.insert(SERVICE_TAG.into(), service.into());
    pb::WeightedDestination { weight, tags: t }
}

fn selectors_match(selectors: &[Selector], tags: &[&Tags]) -> bool {
    selectors.iter().any(|s| tags.iter().any(|t| s.matches(t)))
}

fn selector_specificity(selectors: &[Selector]) -> usize {
    selectors
        .iter()
        .map(|s| s.tags.values().filter(|v| *v != "*").count())
        .max()
        .unwrap_or(0)
}

/// Applies the most specific TrafficRoute whose sources match this proxy and whose
/// destinations match the service.
fn apply_traffic_route(out: &mut pb::OutboundService, own_tags: &[&Tags], view: &MeshView) {
    let mut service_tags = Tags::new();
    service_tags.insert(SERVICE_TAG.into(), out.service.clone());
    let best = view
        .traffic_routes
        .iter()
        .filter(|(_, r)| {
            selectors_match(&r.sources, own_tags)
                && r.destinations.iter().any(|d| d.matches(&service_tags))
        })
        .max_by(|(an, a), (bn, b)| {
            let ka = selector_specificity(&a.sources) + selector_specificity(&a.destinations);
            let kb = selector_specificity(&b.sources) + selector_specificity(&b.destinations);
            ka.cmp(&kb).then_with(|| bn.cmp(an))
        });
    let Some((name, route)) = best else { return };
    let to_dests =
        |split: &[weft_api::policy::Split], dest: Option<&Tags>| -> Vec<pb::WeightedDestination> {
            match dest {
                Some(d) => vec![pb::WeightedDestination {
                    weight: 1,
                    tags: d.clone(),
                }],
                None => split
                    .iter()
                    .map(|s| pb::WeightedDestination {
                        weight: s.weight,
                        tags: s.destination.clone(),
                    })
                    .collect(),
            }
        };
    for h in &route.conf.http {
        let m = &h.matcher;
        out.http_rules.push(pb::HttpRule {
            r#match: Some(pb::HttpMatch {
                path: m.path.as_ref().map(string_match_of),
                method: m.method.clone().unwrap_or_default(),
                headers: m
                    .headers
                    .iter()
                    .map(|(name, v)| pb::HeaderMatch {
                        name: name.clone(),
                        value: Some(string_match_of(v)),
                        present: false,
                        absent: false,
                    })
                    .collect(),
            }),
            destinations: to_dests(&h.split, h.destination.as_ref()),
            request_headers: None,
            response_headers: None,
            origin: format!("TrafficRoute/{name}"),
        });
    }
    out.default_route = to_dests(&route.conf.split, route.conf.destination.as_ref());
    if let Some(lb) = &route.conf.load_balancer {
        use pb::load_balancer::Kind;
        let (kind, choices) = if lb.round_robin.is_some() {
            (Kind::RoundRobin, 0)
        } else if lb.random.is_some() {
            (Kind::Random, 0)
        } else {
            (
                Kind::LeastRequest,
                lb.least_request
                    .as_ref()
                    .and_then(|l| l.choice_count)
                    .unwrap_or(2),
            )
        };
        out.load_balancer = Some(pb::LoadBalancer {
            kind: kind as i32,
            choice_count: choices,
        });
    }
}

fn string_match_of(m: &weft_api::policy::StringMatch) -> pb::StringMatch {
    let kind = if let Some(p) = &m.prefix {
        string_match::Kind::Prefix(p.clone())
    } else if let Some(e) = &m.exact {
        string_match::Kind::Exact(e.clone())
    } else {
        string_match::Kind::Regex(m.regex.clone().unwrap_or_default())
    };
    pb::StringMatch { kind: Some(kind) }
}

/// The MeshHTTPRoute rules for calls from this proxy to `service`, most specific policy first.
fn mesh_http_route_rules(
    dp_name: &str,
    own_tags: &[&Tags],
    service: &str,
    view: &MeshView,
) -> Vec<pb::HttpRule> {
    let mut routes: Vec<(&String, &weft_api::policy::MeshHttpRouteSpec)> = view
        .mesh_http_routes
        .iter()
        .filter(|(_, r)| {
            own_tags
                .iter()
                .any(|t| target_selects(&r.target_ref, dp_name, t))
        })
        .collect();
    routes.sort_by(|(an, a), (bn, b)| {
        specificity(b.target_ref.kind)
            .cmp(&specificity(a.target_ref.kind))
            .then_with(|| an.cmp(bn))
    });
    let mut rules = Vec::new();
    for (name, route) in routes {
        for to in route
            .to
            .iter()
            .filter(|t| t.target_ref.name.as_deref() == Some(service))
        {
            for rule in &to.rules {
                let destinations: Vec<pb::WeightedDestination> = rule
                    .default
                    .backend_refs
                    .iter()
                    .map(|b| destination(b.weight.unwrap_or(1), &b.name, &b.tags))
                    .collect();
                let modifier = |kind: HttpFilterType| {
                    rule.default.filters.iter().filter(|f| f.kind == kind).fold(
                        None::<pb::HeaderModifier>,
                        |acc, f| {
                            let m = match kind {
                                HttpFilterType::RequestHeaderModifier => {
                                    f.request_header_modifier.as_ref()
                                }
                                HttpFilterType::ResponseHeaderModifier => {
                                    f.response_header_modifier.as_ref()
                                }
                            }?;
                            let mut acc = acc.unwrap_or_default();
                            let hv = |v: &weft_api::policy::HeaderValue| pb::HeaderValue {
                                name: v.name.clone(),
                                value: v.value.clone(),
                            };
                            acc.set.extend(m.set.iter().map(hv));
                            acc.add.extend(m.add.iter().map(hv));
                            acc.remove.extend(m.remove.iter().cloned());
                            Some(acc)
                        },
                    )
                };
                for m in &rule.matches {
                    let path = m.path.as_ref().map(|p| pb::StringMatch {
                        kind: Some(match p.kind {
                            PathMatchType::Exact => string_match::Kind::Exact(p.value.clone()),
                            PathMatchType::PathPrefix => {
                                string_match::Kind::Prefix(p.value.clone())
                            }
                            PathMatchType::RegularExpression => {
                                string_match::Kind::Regex(p.value.clone())
                            }
                        }),
                    });
                    let headers = m
                        .headers
                        .iter()
                        .map(|h| {
                            let value = h.value.clone().unwrap_or_default();
                            let (value, present, absent) =
                                match h.kind.unwrap_or(HeaderMatchType::Exact) {
                                    HeaderMatchType::Exact => {
                                        (Some(string_match::Kind::Exact(value)), false, false)
                                    }
                                    HeaderMatchType::Prefix => {
                                        (Some(string_match::Kind::Prefix(value)), false, false)
                                    }
                                    HeaderMatchType::RegularExpression => {
                                        (Some(string_match::Kind::Regex(value)), false, false)
                                    }
                                    HeaderMatchType::Present => (None, true, false),
                                    HeaderMatchType::Absent => (None, false, true),
                                };
                            pb::HeaderMatch {
                                name: h.name.clone(),
                                value: value.map(|k| pb::StringMatch { kind: Some(k) }),
                                present,
                                absent,
                            }
                        })
                        .collect();
                    rules.push(pb::HttpRule {
                        r#match: Some(pb::HttpMatch {
                            path,
                            method: m.method.clone().unwrap_or_default(),
                            headers,
                        }),
                        destinations: destinations.clone(),
                        request_headers: modifier(HttpFilterType::RequestHeaderModifier),
                        response_headers: modifier(HttpFilterType::ResponseHeaderModifier),
                        origin: format!("MeshHTTPRoute/{name}"),
                    });
                }
            }
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::Snapshot {
        pb::Snapshot {
            trust_bundle_pem: "PEM".into(),
            outbounds: vec![pb::OutboundService {
                service: "backend".into(),
                endpoints: vec![pb::Endpoint {
                    address: "10.0.0.2".into(),
                    port: 8080,
                    healthy: true,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_version_hashes_content_only() {
        let bare = sample();
        let mut sent = sample();
        sent.version = content_version(&bare);
        sent.nonce = "1f".into();
        assert_eq!(content_version(&sent), content_version(&bare));
        let mut other = sample();
        other.outbounds[0].endpoints[0].healthy = false;
        assert_ne!(content_version(&other), content_version(&bare));
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
