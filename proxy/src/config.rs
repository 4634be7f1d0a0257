//! The proxy's effective configuration, derived from one discovery [`Snapshot`](weft_api::proto::Snapshot) and shaped for
//! the lookups a connection makes: which service an original destination belongs to, which
//! endpoint to dial next, which inbound a port serves and who may call it.
//!
//! [`ProxyConfig::from_snapshot`] validates as it converts; its error is the reason the proxy
//! NACKs a snapshot it cannot apply. The data path reads the config through an
//! `arc_swap::ArcSwap<ProxyConfig>`: each connection takes the config current when it is
//! accepted and keeps it to the end, so a new config applies to new connections only.

use crate::balance::EndpointStates;
use crate::detect::Protocol;
use crate::route::{EndpointsByService, build_service};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use weft_api::proto::{self as pb, mtls::Mode, permission_rule::Action};

pub use crate::route::{SERVICE_TAG, Service};

/// Why a snapshot cannot be applied (becomes the NACK reason).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required part of the snapshot is absent.
    #[error("snapshot has no {0}")]
    Missing(&'static str),
    /// A field holds a value the proxy cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// Where the value sits, e.g. `inbounds[1].service_port`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// How the mesh's mTLS treats inbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Only mesh mTLS is accepted.
    Strict,
    /// mTLS and plaintext are both accepted; plaintext is not authorized by source.
    Permissive,
}

/// One inbound of this proxy: a port the mesh reaches it on and the app behind it.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The port mesh peers connect to.
    pub port: u16,
    /// Where the app listens (`serviceAddress:servicePort`).
    pub upstream: SocketAddr,
    /// The inbound's `kuma.io/service`.
    pub service: String,
    /// The protocol fixed by `kuma.io/protocol`; `None` means detect.
    pub protocol: Option<Protocol>,
    /// Ordered permission rules; the first whose source matches decides.
    pub permissions: Vec<Permission>,
}

/// One permission rule of an inbound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// The source service, `None` for any (`*`).
    pub source: Option<String>,
    /// Whether a matching source is let in.
    pub allow: bool,
    /// The policy the rule comes from, for logs.
    pub origin: String,
}

/// The verdict on one source identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// Let in by the rule from this policy.
    Allow(String),
    /// Refused by the rule from this policy, or by no rule matching (`None`).
    Deny(Option<String>),
}

impl Inbound {
    /// Applies the rules in order to a source that holds the identities `sources` (the
    /// services in its certificate); the first rule matching any of them decides, and no
    /// match denies.
    pub fn authorize(&self, sources: &[String]) -> Authz {
        for rule in &self.permissions {
            let matches = match &rule.source {
                None => !sources.is_empty(),
                Some(s) => sources.iter().any(|src| src == s),
            };
            if matches {
                return if rule.allow {
                    Authz::Allow(rule.origin.clone())
                } else {
                    Authz::Deny(Some(rule.origin.clone()))
                };
            }
        }
        Authz::Deny(None)
    }
}

/// The kinds of listeners the data path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerKind {
    /// `redirectPortOutbound`: reads the original destination of redirected connections.
    TransparentOutbound,
    /// `redirectPortInbound`: the original destination's port tells the inbound.
    TransparentInbound,
    /// An explicit `networking.outbound[]` listener bound to one service.
    Outbound,
    /// An explicit inbound listener on an inbound `port`.
    Inbound,
}

/// The effective config of one proxy.
#[derive(Debug)]
pub struct ProxyConfig {
    /// The snapshot's version.
    pub version: String,
    /// The mesh this proxy belongs to.
    pub mesh: String,
    /// The dataplane's name.
    pub dataplane: String,
    /// The dataplane's address.
    pub address: IpAddr,
    /// The transparent inbound port, when transparent proxying is on.
    pub redirect_inbound: Option<u16>,
    /// The transparent outbound port, when transparent proxying is on.
    pub redirect_outbound: Option<u16>,
    /// `None` when mTLS is off.
    pub mtls: Option<MtlsMode>,
    /// Whether non-mesh destinations may be reached.
    pub passthrough: bool,
    /// The mesh's CA certificates (PEM).
    pub trust_bundle_pem: String,
    /// Inbounds by port.
    pub inbounds: BTreeMap<u16, Inbound>,
    /// Every mesh service by name.
    pub services: HashMap<String, Service>,
    /// `address:port` of every inbound in the mesh → its service.
    pub mesh_destinations: HashMap<SocketAddr, String>,
    /// Explicit outbound listeners: listen address → service.
    pub outbound_listeners: BTreeMap<SocketAddr, String>,
    /// The ports the proxy itself listens on (for the loop guard).
    pub own_ports: HashSet<u16>,
    /// Where the data path reports requests and connections ([`crate::telemetry`]). The
    /// running proxy's shared handle (`run.rs` sets it with [`ProxyConfig::with_telemetry`]);
    /// a config straight from [`ProxyConfig::from_snapshot`] has a detached one.
    pub telemetry: crate::telemetry::Telemetry,
}

fn port(v: u32, field: impl Into<String>) -> Result<u16, ConfigError> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, format!("{v} is not a port (1-65535)"))),
    }
}

fn ip(v: &str, field: impl Into<String>) -> Result<IpAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(field, format!("{v:?} is not an IP address")))
}

/// Reads a `kuma.io/protocol` value: empty means detect.
pub fn protocol_hint(v: &str) -> Result<Option<Protocol>, String> {
    match v {
        "" => Ok(None),
        "tcp" => Ok(Some(Protocol::Opaque)),
        "http" => Ok(Some(Protocol::Http1)),
        "http2" | "grpc" => Ok(Some(Protocol::Http2)),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

impl ProxyConfig {
    /// Converts and validates a snapshot. Errors name the field the proxy cannot apply.
    /// Endpoint state (latency, ejection) starts fresh; a running data path uses
    /// [`ProxyConfig::from_snapshot_with`] to keep it.
    pub fn from_snapshot(snap: &pb::Snapshot) -> Result<Self, ConfigError> {
        Self::from_snapshot_with(snap, &EndpointStates::default())
    }

    /// Like [`ProxyConfig::from_snapshot`], taking endpoint state from `states` (see
    /// [`crate::DataPath::endpoint_states`]) so what the old config learned carries over.
    pub fn from_snapshot_with(
        snap: &pb::Snapshot,
        states: &EndpointStates,
    ) -> Result<Self, ConfigError> {
        let dp = snap
            .dataplane
            .as_ref()
            .ok_or(ConfigError::Missing("dataplane"))?;
        let mesh_settings = snap.mesh.as_ref().ok_or(ConfigError::Missing("mesh"))?;
        if dp.mesh.is_empty() {
            return Err(invalid("dataplane.mesh", "is empty"));
        }
        if !mesh_settings.name.is_empty() && mesh_settings.name != dp.mesh {
            return Err(invalid(
                "mesh.name",
                format!(
                    "{:?} differs from dataplane.mesh {:?}",
                    mesh_settings.name, dp.mesh
                ),
            ));
        }
        let address = ip(&dp.address, "dataplane.address")?;
        let redirect_inbound = match dp.redirect_port_inbound {
            0 => None,
            p => Some(port(p, "dataplane.redirect_port_inbound")?),
        };
        let redirect_outbound = match dp.redirect_port_outbound {
            0 => None,
            p => Some(port(p, "dataplane.redirect_port_outbound")?),
        };
        if redirect_inbound.is_some() && redirect_inbound == redirect_outbound {
            return Err(invalid(
                "dataplane.redirect_port_outbound",
                "equals redirect_port_inbound",
            ));
        }
        let mtls = match &mesh_settings.mtls {
            Some(m) if m.enabled => Some(match Mode::try_from(m.mode) {
                Ok(Mode::Strict) => MtlsMode::Strict,
                Ok(Mode::Permissive) => MtlsMode::Permissive,
                Err(_) => return Err(invalid("mesh.mtls.mode", format!("unknown {}", m.mode))),
            }),
            _ => None,
        };
        if mtls.is_some() && snap.trust_bundle_pem.trim().is_empty() {
            return Err(invalid("trust_bundle_pem", "is empty while mTLS is on"));
        }

        let mut inbounds = BTreeMap::new();
        for (i, ib) in snap.inbounds.iter().enumerate() {
            let f = |name: &str| format!("inbounds[{i}].{name}");
            let p = port(ib.port, f("port"))?;
            let upstream_ip = if ib.service_address.is_empty() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                ip(&ib.service_address, f("service_address"))?
            };
            let upstream = SocketAddr::new(upstream_ip, port(ib.service_port, f("service_port"))?);
            if ib.service.is_empty() {
                return Err(invalid(f("service"), "is empty"));
            }
            let protocol = protocol_hint(&ib.protocol).map_err(|r| invalid(f("protocol"), r))?;
            let mut permissions = Vec::with_capacity(ib.permissions.len());
            for (j, rule) in ib.permissions.iter().enumerate() {
                let allow = match Action::try_from(rule.action) {
                    Ok(Action::Allow | Action::AllowWithShadowDeny) => true,
                    Ok(Action::Deny) => false,
                    Err(_) => {
                        return Err(invalid(
                            f(&format!("permissions[{j}].action")),
                            format!("unknown {}", rule.action),
                        ));
                    }
                };
                let source = match rule.source_service.as_str() {
                    "*" => None,
                    "" => {
                        return Err(invalid(
                            f(&format!("permissions[{j}].source_service")),
                            "is empty",
                        ));
                    }
                    s => Some(s.to_string()),
                };
                permissions.push(Permission {
                    source,
                    allow,
                    origin: rule.origin.clone(),
                });
            }
            let inbound = Inbound {
                port: p,
                upstream,
                service: ib.service.clone(),
                protocol,
                permissions,
            };
            if inbounds.insert(p, inbound).is_some() {
                return Err(invalid(f("port"), format!("{p} is declared twice")));
            }
        }

        // Endpoints of other dataplanes: one unusable endpoint must not make every proxy of
        // the mesh refuse its config, so it is skipped with a warning.
        let mut mesh_destinations = HashMap::new();
        let mut endpoints_by_service: EndpointsByService<'_> = HashMap::new();
        for out in &snap.outbounds {
            for ep in &out.endpoints {
                let (Ok(a), Ok(p)) = (ep.address.parse::<IpAddr>(), u16::try_from(ep.port)) else {
                    tracing::warn!(service = %out.service, address = %ep.address, port = ep.port,
                        "skipping an endpoint that is not ip:port");
                    continue;
                };
                let sa = SocketAddr::new(a, p);
                if let Some(prev) = mesh_destinations.insert(sa, out.service.clone())
                    && prev != out.service
                {
                    tracing::warn!(%sa, first = %prev, second = %out.service,
                        "two services share one endpoint; keeping the first");
                    mesh_destinations.insert(sa, prev);
                }
                endpoints_by_service
                    .entry(out.service.as_str())
                    .or_default()
                    .push((sa, ep));
            }
        }

        let mut services = HashMap::new();
        for (i, out) in snap.outbounds.iter().enumerate() {
            if out.service.is_empty() {
                return Err(invalid(format!("outbounds[{i}].service"), "is empty"));
            }
            let svc = build_service(
                out,
                &format!("outbounds[{i}]"),
                &endpoints_by_service,
                states,
            )
            .map_err(|e| match e.split_once(": ") {
                Some((field, reason)) => invalid(field, reason),
                None => invalid(format!("outbounds[{i}]"), e),
            })?;
            services.insert(out.service.clone(), svc);
        }

        let mut outbound_listeners = BTreeMap::new();
        for (i, l) in snap.outbound_listeners.iter().enumerate() {
            let f = |name: &str| format!("outbound_listeners[{i}].{name}");
            let a = if l.address.is_empty() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                ip(&l.address, f("address"))?
            };
            let sa = SocketAddr::new(a, port(l.port, f("port"))?);
            if l.service.is_empty() {
                return Err(invalid(f("service"), "is empty"));
            }
            if outbound_listeners.insert(sa, l.service.clone()).is_some() {
                return Err(invalid(f("port"), format!("{sa} is declared twice")));
            }
        }

        let cfg = ProxyConfig {
            version: snap.version.clone(),
            mesh: dp.mesh.clone(),
            dataplane: dp.name.clone(),
            address,
            redirect_inbound,
            redirect_outbound,
            mtls,
            passthrough: mesh_settings.passthrough,
            trust_bundle_pem: snap.trust_bundle_pem.clone(),
            inbounds,
            services,
            mesh_destinations,
            outbound_listeners,
            own_ports: HashSet::new(),
            telemetry: crate::telemetry::Telemetry::default(),
        };
        cfg.check_listener_clashes()?;
        cfg.check_inbound_loops()?;
        let mut cfg = cfg;
        cfg.own_ports = cfg
            .listeners(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            .into_iter()
            .map(|(sa, _)| sa.port())
            .collect();
        Ok(cfg)
    }

    /// The same config reporting to `telemetry` (the proxy's shared handle).
    pub fn with_telemetry(mut self, telemetry: crate::telemetry::Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Whether the proxy intercepts traffic transparently (iptables redirect).
    pub fn transparent(&self) -> bool {
        self.redirect_inbound.is_some() || self.redirect_outbound.is_some()
    }

    /// The listeners this config asks for. Transparent listeners bind `transparent_ip`
    /// (normally the unspecified address); explicit inbound listeners bind the dataplane
    /// address and exist only without transparent inbound redirection.
    pub fn listeners(&self, transparent_ip: IpAddr) -> Vec<(SocketAddr, ListenerKind)> {
        let mut out = Vec::new();
        if let Some(p) = self.redirect_outbound {
            out.push((
                SocketAddr::new(transparent_ip, p),
                ListenerKind::TransparentOutbound,
            ));
        }
        if let Some(p) = self.redirect_inbound {
            out.push((
                SocketAddr::new(transparent_ip, p),
                ListenerKind::TransparentInbound,
            ));
        } else {
            for p in self.inbounds.keys() {
                out.push((SocketAddr::new(self.address, *p), ListenerKind::Inbound));
            }
        }
        for sa in self.outbound_listeners.keys() {
            out.push((*sa, ListenerKind::Outbound));
        }
        out
    }

    /// Whether `ip` is one of this proxy's own addresses as far as the config tells
    /// (loopback, unspecified, or the dataplane address).
    pub fn is_own_ip(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || ip.is_unspecified() || ip == self.address
    }

    /// An explicit inbound listens on `address:port`; an app "behind" it on that same
    /// socket would be the proxy itself, and every connection would loop through it until
    /// file descriptors run out.
    fn check_inbound_loops(&self) -> Result<(), ConfigError> {
        if self.redirect_inbound.is_some() {
            return Ok(());
        }
        for (port, inbound) in &self.inbounds {
            let up = inbound.upstream;
            let same_ip = up.ip() == self.address
                || up.ip().is_unspecified()
                || self.address.is_unspecified();
            if up.port() == *port && same_ip {
                return Err(invalid(
                    format!("inbounds[port {port}]"),
                    format!(
                        "the app's address {up} is the inbound's own listener: give the app \
                         another port (servicePort) or address (serviceAddress)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_listener_clashes(&self) -> Result<(), ConfigError> {
        let mut seen: HashMap<u16, Vec<IpAddr>> = HashMap::new();
        for (sa, kind) in self.listeners(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) {
            let ips = seen.entry(sa.port()).or_default();
            let clash = ips
                .iter()
                .any(|o| *o == sa.ip() || o.is_unspecified() || sa.ip().is_unspecified());
            if clash {
                return Err(invalid(
                    "listeners",
                    format!("{kind:?} listener {sa} collides with another listener"),
                ));
            }
            ips.push(sa.ip());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> pb::Snapshot {
        pb::Snapshot {
            version: "v1".into(),
            dataplane: Some(pb::DataplaneIdentity {
                mesh: "default".into(),
                name: "web-1".into(),
                address: "10.0.0.1".into(),
                ..Default::default()
            }),
            mesh: Some(pb::MeshSettings {
                name: "default".into(),
                passthrough: true,
                ..Default::default()
            }),
            inbounds: vec![pb::InboundConfig {
                port: 10001,
                service_address: "127.0.0.1".into(),
                service_port: 8080,
                service: "web".into(),
                permissions: vec![
                    pb::PermissionRule {
                        source_service: "evil".into(),
                        action: Action::Deny as i32,
                        origin: "p1".into(),
                    },
                    pb::PermissionRule {
                        source_service: "*".into(),
                        action: Action::Allow as i32,
                        origin: "p2".into(),
                    },
                ],
                ..Default::default()
            }],
            outbounds: vec![pb::OutboundService {
                service: "backend".into(),
                endpoints: vec![
                    ep("10.0.0.2", 10001, "v1", true),
                    ep("10.0.0.3", 10001, "v2", true),
                    ep("10.0.0.4", 10001, "v2", false),
                    ep("backend.local", 10001, "v2", true),
                ],
                default_route: vec![pb::WeightedDestination {
                    weight: 1,
                    tags: [
                        (SERVICE_TAG.to_string(), "backend".to_string()),
                        ("version".to_string(), "v2".to_string()),
                    ]
                    .into(),
                }],
                ..Default::default()
            }],
            outbound_listeners: vec![pb::OutboundListener {
                address: "127.0.0.1".into(),
                port: 20001,
                service: "backend".into(),
            }],
            ..Default::default()
        }
    }

    fn ep(addr: &str, port: u32, version: &str, healthy: bool) -> pb::Endpoint {
        pb::Endpoint {
            address: addr.into(),
            port,
            tags: [
                (SERVICE_TAG.to_string(), "backend".to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into(),
            healthy,
            dataplane: String::new(),
        }
    }

    #[test]
    fn converts_a_snapshot() {
        let cfg = ProxyConfig::from_snapshot(&snap()).unwrap();
        assert_eq!(
            cfg.mesh_destinations.len(),
            3,
            "the hostname endpoint is skipped"
        );
        let svc = &cfg.services["backend"];
        // Only the healthy v2 endpoint is in the subset.
        for _ in 0..3 {
            let t = svc.pick(&[]).unwrap();
            assert_eq!(t.service, "backend");
            assert_eq!(t.endpoint.addr, "10.0.0.3:10001".parse().unwrap());
        }
        let ib = &cfg.inbounds[&10001];
        assert_eq!(
            ib.authorize(&["evil".into()]),
            Authz::Deny(Some("p1".into()))
        );
        assert_eq!(ib.authorize(&["web".into()]), Authz::Allow("p2".into()));
        assert_eq!(ib.authorize(&[]), Authz::Deny(None));
        assert!(!cfg.transparent());
        assert_eq!(cfg.listeners(IpAddr::V4(Ipv4Addr::UNSPECIFIED)).len(), 2);
    }

    #[test]
    fn round_robin_and_weights() {
        let mut s = snap();
        s.outbounds[0].default_route = vec![
            pb::WeightedDestination {
                weight: 1,
                tags: [("version".to_string(), "v1".to_string())].into(),
            },
            pb::WeightedDestination {
                weight: 3,
                tags: [("version".to_string(), "v2".to_string())].into(),
            },
        ];
        let cfg = ProxyConfig::from_snapshot(&s).unwrap();
        let svc = &cfg.services["backend"];
        let picks: Vec<_> = (0..8)
            .map(|_| svc.pick(&[]).unwrap().endpoint.addr.ip().to_string())
            .collect();
        assert_eq!(picks.iter().filter(|p| *p == "10.0.0.2").count(), 2);
        assert_eq!(picks.iter().filter(|p| *p == "10.0.0.3").count(), 6);
    }

    #[test]
    fn an_explicit_inbound_whose_app_is_its_own_listener_is_refused() {
        let mut s = snap();
        s.inbounds[0].service_address = "10.0.0.1".into();
        s.inbounds[0].service_port = 10001;
        let e = ProxyConfig::from_snapshot(&s).unwrap_err().to_string();
        assert!(e.contains("own listener"), "{e}");
        // The same port on another address (the app on loopback) is fine.
        s.inbounds[0].service_address = "127.0.0.1".into();
        ProxyConfig::from_snapshot(&s).expect("the app on loopback");
    }

    #[test]
    fn rejects_what_it_cannot_apply() {
        let mut s = snap();
        s.inbounds[0].service_port = 70000;
        let e = ProxyConfig::from_snapshot(&s).unwrap_err().to_string();
        assert!(e.contains("inbounds[0].service_port"), "{e}");

        let mut s = snap();
        s.mesh.as_mut().unwrap().mtls = Some(pb::Mtls {
            enabled: true,
            ..Default::default()
        });
        let e = ProxyConfig::from_snapshot(&s).unwrap_err().to_string();
        assert!(e.contains("trust_bundle_pem"), "{e}");

        let mut s = snap();
        s.outbound_listeners[0].address = "10.0.0.1".into();
        s.outbound_listeners[0].port = 10001;
        let e = ProxyConfig::from_snapshot(&s).unwrap_err().to_string();
        assert!(e.contains("collides"), "{e}");

        let mut s = snap();
        s.inbounds[0].protocol = "kafka".into();
        assert!(ProxyConfig::from_snapshot(&s).is_err());

        let mut s = snap();
        s.dataplane = None;
        assert!(ProxyConfig::from_snapshot(&s).is_err());
    }
}
