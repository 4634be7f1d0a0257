//! Validation of typed resources: names, tags, ports, durations, weights, enum-like strings
//! and the consistency between fields. Checks that need the store (the mesh exists, the
//! name is free) are the control plane's; everything a resource says about itself is here.

use crate::dataplane::{PROTOCOL_TAG, SERVICE_TAG};
use crate::duration::parse_duration;
use crate::mesh::{CaBackendType, DataSource, LoggingBackendType, MeshSpec, TracingBackendType};
use crate::policy::*;
use crate::resources::{DataplaneSpec, Resource, ResourceType, Spec};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

/// A field that failed validation: its path in the universal form and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{path}`: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `networking.inbound[0].port`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

type Result<T = ()> = std::result::Result<T, FieldError>;

fn fail(path: impl Into<String>, message: impl Into<String>) -> Result {
    Err(FieldError {
        path: path.into(),
        message: message.into(),
    })
}

/// The protocols `kuma.io/protocol` may name.
pub const PROTOCOLS: [&str; 4] = ["tcp", "http", "http2", "grpc"];

/// Validates everything a resource says about itself.
pub fn validate(resource: &Resource) -> Result {
    let ty = resource.resource_type();
    validate_name(
        &resource.name,
        if ty == ResourceType::Mesh { 63 } else { 253 },
        ty == ResourceType::Mesh,
    )
    .or_else(|m| fail("name", m))?;
    if let Some(mesh) = &resource.mesh {
        validate_name(mesh, 63, true).or_else(|m| fail("mesh", m))?;
    }
    for (k, v) in &resource.labels {
        if k.is_empty() || v.len() > 253 {
            fail(
                format!("labels.{k}"),
                "label keys must be non-empty and values at most 253 characters",
            )?;
        }
    }
    match &resource.spec {
        Spec::Mesh(m) => validate_mesh(m),
        Spec::Dataplane(d) => validate_dataplane(d),
        Spec::TrafficPermission(p) => {
            validate_selectors("sources", &p.sources, false)?;
            validate_selectors("destinations", &p.destinations, true)
        }
        Spec::TrafficRoute(r) => validate_traffic_route(r),
        Spec::MeshTrafficPermission(p) => validate_mtp(p),
        Spec::MeshHttpRoute(r) => validate_mesh_http_route(r),
    }
}

/// The rules a resource is held to when it is written, on top of [`validate`]'s. They came
/// after resources that break them could be stored, so reading those back (configuration,
/// listings) must not drop them, which could change what a mesh allows: a stored one keeps
/// working as it did (its extra selector tags ignored), and only new writes are refused.
pub fn admit(resource: &Resource) -> Result {
    match &resource.spec {
        Spec::TrafficPermission(p) => validate_permission_sources(&p.sources),
        Spec::TrafficRoute(r) => {
            for (i, d) in r.destinations.iter().enumerate() {
                // Routes are chosen per destination service (subsets by the split).
                only_service_tag(
                    &format!("destinations[{i}].match"),
                    &d.tags,
                    "a TrafficRoute's destination is a service",
                )?;
            }
            Ok(())
        }
        Spec::Dataplane(d) => admit_dataplane(d),
        Spec::MeshHttpRoute(r) => admit_header_modifiers(r),
        _ => Ok(()),
    }
}

/// Headers a MeshHTTPRoute filter may not set, add or remove: the ones that frame or route
/// the message (connection-specific ones are dropped at every hop, and HTTP/2 refuses a
/// message that carries them, so every matching request would fail; `content-length` would
/// frame the body wrongly; `host` is the request's authority, which Envoy refuses to change
/// too; `weft-downstream-protocol` is the proxies' own). weft's rule: Kuma passes such names
/// on to Envoy.
pub const RESERVED_HEADERS: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "weft-downstream-protocol",
];

/// Whether `name` (any case) is one of [`RESERVED_HEADERS`].
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
}

fn admit_header_modifiers(r: &MeshHttpRouteSpec) -> Result {
    for (i, to) in r.to.iter().enumerate() {
        for (j, rule) in to.rules.iter().enumerate() {
            for (k, f) in rule.default.filters.iter().enumerate() {
                let fp = format!("spec.to[{i}].rules[{j}].default.filters[{k}]");
                let modifiers = [
                    ("requestHeaderModifier", &f.request_header_modifier),
                    ("responseHeaderModifier", &f.response_header_modifier),
                ];
                for (field, m) in modifiers {
                    let Some(m) = m else { continue };
                    let mp = format!("{fp}.{field}");
                    for (list, values) in [("set", &m.set), ("add", &m.add)] {
                        for (n, h) in values.iter().enumerate() {
                            let hp = format!("{mp}.{list}[{n}]");
                            admit_header_name(&format!("{hp}.name"), &h.name)?;
                            if http::HeaderValue::from_str(&h.value).is_err() {
                                fail(
                                    format!("{hp}.value"),
                                    "is not a valid header value (control characters)",
                                )?;
                            }
                        }
                    }
                    for (n, name) in m.remove.iter().enumerate() {
                        admit_header_name(&format!("{mp}.remove[{n}]"), name)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn admit_header_name(path: &str, name: &str) -> Result {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return fail(path, format!("{name:?} is not a valid header name"));
    }
    if is_reserved_header(name) {
        return fail(
            path,
            format!(
                "{name:?} cannot be changed by a route: it frames or routes the message \
                 (reserved: {})",
                RESERVED_HEADERS.join(", ")
            ),
        );
    }
    Ok(())
}

fn admit_dataplane(d: &DataplaneSpec) -> Result {
    let n = &d.networking;
    for (i, ib) in n.inbound.iter().enumerate() {
        let p = format!("networking.inbound[{i}]");
        if let Some(a) = &ib.address {
            // Peers dial the inbound's address; in explicit mode the proxy listens on
            // `networking.address` only, so another address would be one nobody serves.
            // (In transparent mode every local address is intercepted.)
            if n.transparent_proxying.is_none() && !same_ip(a, &n.address) {
                fail(
                    format!("{p}.address"),
                    "an inbound address other than `networking.address` needs transparent \
                     proxying: weft's explicit inbound listeners bind `networking.address`",
                )?;
            }
        }
        if n.transparent_proxying.is_none()
            && ib.app_port() == ib.port
            && (same_ip(ib.app_address(), &n.address)
                || [ib.app_address(), n.address.as_str()]
                    .iter()
                    .any(|a| a.parse::<IpAddr>().is_ok_and(|a| a.is_unspecified())))
        {
            // The explicit listener is `networking.address:port`: the app cannot be there.
            fail(
                format!("{p}.servicePort"),
                format!(
                    "the app at {}:{} would be the inbound's own listener: give the app \
                     another servicePort or serviceAddress",
                    ib.app_address(),
                    ib.app_port()
                ),
            )?;
        }
    }
    for (i, ob) in n.outbound.iter().enumerate() {
        let p = format!("networking.outbound[{i}]");
        only_service_tag(
            &format!("{p}.tags"),
            &ob.tags,
            "an outbound is for one service",
        )?;
    }
    Ok(())
}

/// Checks a DNS-1123 name: lower-case alphanumerics and `-` (and `.` between labels unless
/// `label_only`), starting and ending alphanumeric, at most `max` characters.
pub fn validate_name(name: &str, max: usize, label_only: bool) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > max {
        return Err(format!("{name:?} is longer than {max} characters"));
    }
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (!label_only && c == '.')
    };
    let parts_ok = name.split('.').all(|p| {
        p.starts_with(|c: char| c.is_ascii_alphanumeric())
            && p.ends_with(|c: char| c.is_ascii_alphanumeric())
    });
    if !name.chars().all(ok_char) || !parts_ok {
        let what = if label_only {
            "a DNS-1123 label"
        } else {
            "a DNS-1123 name"
        };
        return Err(format!(
            "{name:?} is not {what}: use lower-case letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn validate_port(path: &str, port: u32) -> Result {
    if !(1..=65535).contains(&port) {
        fail(path, format!("port {port} is out of range 1-65535"))?;
    }
    Ok(())
}

fn validate_duration(path: &str, value: &str) -> Result {
    match parse_duration(value) {
        Ok(d) if d.is_zero() => fail(path, "must be greater than zero"),
        Ok(_) => Ok(()),
        Err(e) => fail(path, e.to_string()),
    }
}

/// The longest certificate lifetime accepted: 100 years. An X.509 validity ends by the year
/// 9999, and no mesh rotates its CA less often than this.
const MAX_CERT_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// A certificate lifetime: a duration greater than zero and at most [`MAX_CERT_LIFETIME`].
fn validate_cert_lifetime(path: &str, value: &str) -> Result {
    validate_duration(path, value)?;
    match parse_duration(value) {
        Ok(d) if d > MAX_CERT_LIFETIME => fail(path, "must be at most 100 years (876000h)"),
        _ => Ok(()),
    }
}

/// A service an inbound offers: its name is a segment of the proxy's SPIFFE identity
/// (`spiffe://<mesh>/<service>`), so it holds letters, digits and `-._~` only, as the CA
/// requires (else the proxy registers and never gets a certificate).
fn validate_service_name(path: &str, service: &str) -> Result {
    if !crate::dataplane::is_service_name(service) {
        fail(
            path,
            format!(
                "{service:?} cannot name a service: its identity is spiffe://<mesh>/{service}, \
                 which takes letters, digits and -._~ only"
            ),
        )?;
    }
    Ok(())
}

fn validate_ip(path: &str, value: &str) -> Result {
    if value.parse::<IpAddr>().is_err() {
        fail(path, format!("{value:?} is not an IP address"))?;
    }
    Ok(())
}

fn validate_tags(path: &str, tags: &BTreeMap<String, String>, need_service: bool) -> Result {
    if need_service && tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) {
        fail(
            format!("{path}.{SERVICE_TAG}"),
            format!("tag `{SERVICE_TAG}` is required"),
        )?;
    }
    for (k, v) in tags {
        if k.is_empty() || k.contains(char::is_whitespace) {
            fail(
                format!("{path}.{k}"),
                "tag names must be non-empty and contain no whitespace",
            )?;
        }
        if v.is_empty() {
            fail(format!("{path}.{k}"), "tag values must not be empty")?;
        }
    }
    if let Some(p) = tags.get(PROTOCOL_TAG)
        && !PROTOCOLS.contains(&p.as_str())
    {
        fail(
            format!("{path}.{PROTOCOL_TAG}"),
            format!(
                "unknown protocol {p:?}, expected one of {}",
                PROTOCOLS.join(", ")
            ),
        )?;
    }
    Ok(())
}

fn validate_backend_ref(
    path: &str,
    kind: &str,
    name: Option<&str>,
    names: &HashSet<&str>,
) -> Result {
    if let Some(n) = name.filter(|n| !n.is_empty())
        && !names.contains(n)
    {
        fail(path, format!("{kind} {n:?} is not one of the backends"))?;
    }
    Ok(())
}

fn unique_names<'a>(path: &str, names: impl Iterator<Item = &'a str>) -> Result<HashSet<&'a str>> {
    let mut seen = HashSet::new();
    for (i, n) in names.enumerate() {
        if n.is_empty() {
            fail(format!("{path}[{i}].name"), "must not be empty")?;
        }
        if !seen.insert(n) {
            fail(
                format!("{path}[{i}].name"),
                format!("duplicate backend name {n:?}"),
            )?;
        }
    }
    Ok(seen)
}

fn validate_data_source(path: &str, ds: Option<&DataSource>) -> Result {
    let Some(ds) = ds else {
        return fail(path, "required for a provided CA");
    };
    let set = [
        ds.file.is_some(),
        ds.inline.is_some(),
        ds.inline_string.is_some(),
    ];
    if set.iter().filter(|x| **x).count() != 1 {
        fail(
            path,
            "exactly one of `file`, `inline` or `inlineString` is required",
        )?;
    }
    if let Some(b64) = &ds.inline {
        let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
        let ok = !clean.is_empty()
            && clean.len().is_multiple_of(4)
            && clean
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='));
        if !ok {
            fail(format!("{path}.inline"), "is not valid base64")?;
        }
    }
    Ok(())
}

fn validate_mesh(m: &MeshSpec) -> Result {
    if let Some(mtls) = &m.mtls {
        let names = unique_names(
            "mtls.backends",
            mtls.backends.iter().map(|b| b.name.as_str()),
        )?;
        validate_backend_ref(
            "mtls.enabledBackend",
            "enabledBackend",
            mtls.enabled_backend.as_deref(),
            &names,
        )?;
        for (i, b) in mtls.backends.iter().enumerate() {
            let p = format!("mtls.backends[{i}]");
            if let Some(exp) = b
                .dp_cert
                .as_ref()
                .and_then(|d| d.rotation.as_ref())
                .and_then(|r| r.expiration.as_ref())
            {
                validate_cert_lifetime(&format!("{p}.dpCert.rotation.expiration"), exp)?;
            }
            let conf = b.conf.clone().unwrap_or_default();
            match b.kind {
                CaBackendType::Builtin => {
                    if conf.cert.is_some() || conf.key.is_some() {
                        fail(
                            format!("{p}.conf"),
                            "`cert` and `key` belong to a provided backend, not builtin",
                        )?;
                    }
                    if let Some(exp) = conf.ca_cert.as_ref().and_then(|c| c.expiration.as_ref()) {
                        validate_cert_lifetime(&format!("{p}.conf.caCert.expiration"), exp)?;
                    }
                }
                CaBackendType::Provided => {
                    if conf.ca_cert.is_some() {
                        fail(
                            format!("{p}.conf.caCert"),
                            "`caCert` belongs to a builtin backend, not provided",
                        )?;
                    }
                    validate_data_source(&format!("{p}.conf.cert"), conf.cert.as_ref())?;
                    validate_data_source(&format!("{p}.conf.key"), conf.key.as_ref())?;
                }
            }
        }
    }
    if let Some(metrics) = &m.metrics {
        let names = unique_names(
            "metrics.backends",
            metrics.backends.iter().map(|b| b.name.as_str()),
        )?;
        validate_backend_ref(
            "metrics.enabledBackend",
            "enabledBackend",
            metrics.enabled_backend.as_deref(),
            &names,
        )?;
        for (i, b) in metrics.backends.iter().enumerate() {
            let p = format!("metrics.backends[{i}].conf");
            if let Some(conf) = &b.conf {
                if let Some(port) = conf.port {
                    validate_port(&format!("{p}.port"), port)?;
                }
                if let Some(path) = &conf.path
                    && !path.starts_with('/')
                {
                    fail(format!("{p}.path"), format!("{path:?} must start with '/'"))?;
                }
            }
        }
    }
    if let Some(tracing) = &m.tracing {
        let names = unique_names(
            "tracing.backends",
            tracing.backends.iter().map(|b| b.name.as_str()),
        )?;
        validate_backend_ref(
            "tracing.defaultBackend",
            "defaultBackend",
            tracing.default_backend.as_deref(),
            &names,
        )?;
        for (i, b) in tracing.backends.iter().enumerate() {
            let p = format!("tracing.backends[{i}]");
            if let Some(s) = b.sampling
                && !(0.0..=100.0).contains(&s)
            {
                fail(
                    format!("{p}.sampling"),
                    format!("{s} is out of range 0-100"),
                )?;
            }
            let conf = b.conf.clone().unwrap_or_default();
            let (field, value, other) = match b.kind {
                TracingBackendType::Zipkin => ("url", conf.url, conf.endpoint.map(|_| "endpoint")),
                TracingBackendType::Opentelemetry => {
                    ("endpoint", conf.endpoint, conf.url.map(|_| "url"))
                }
            };
            if let Some(o) = other {
                fail(
                    format!("{p}.conf.{o}"),
                    format!("not used by this backend type; use `{field}`"),
                )?;
            }
            match value {
                None => fail(format!("{p}.conf.{field}"), "required")?,
                Some(v) => {
                    if let Err(problem) = b.kind.collector_url(&v) {
                        fail(format!("{p}.conf.{field}"), problem)?;
                    }
                }
            }
        }
    }
    if let Some(logging) = &m.logging {
        let names = unique_names(
            "logging.backends",
            logging.backends.iter().map(|b| b.name.as_str()),
        )?;
        validate_backend_ref(
            "logging.defaultBackend",
            "defaultBackend",
            logging.default_backend.as_deref(),
            &names,
        )?;
        for (i, b) in logging.backends.iter().enumerate() {
            let p = format!("logging.backends[{i}].conf");
            let conf = b.conf.clone().unwrap_or_default();
            match b.kind {
                LoggingBackendType::File => {
                    if conf.path.as_deref().is_none_or(str::is_empty) {
                        fail(format!("{p}.path"), "required for a file backend")?;
                    }
                }
                LoggingBackendType::Tcp => {
                    match conf.address.as_deref().and_then(|a| a.rsplit_once(':')) {
                        Some((host, port))
                            if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                        _ => fail(
                            format!("{p}.address"),
                            "required for a tcp backend, as host:port",
                        )?,
                    }
                }
            }
        }
    }
    Ok(())
}

fn validate_dataplane(d: &DataplaneSpec) -> Result {
    let n = &d.networking;
    if n.address.is_empty() {
        fail("networking.address", "must not be empty")?;
    }
    if n.address.parse::<IpAddr>().is_err() {
        // Kuma also takes a host name here; weft's proxies and endpoints need the address
        // itself, and a host name would register a proxy that can never serve.
        fail(
            "networking.address",
            format!("{:?} is not an IP address", n.address),
        )?;
    }
    if n.inbound.is_empty() {
        fail(
            "networking.inbound",
            "a dataplane needs at least one inbound",
        )?;
    }
    let mut ports: BTreeMap<u32, String> = BTreeMap::new();
    let mut claim = |path: String, port: u32| -> Result {
        if let Some(first) = ports.insert(port, path.clone()) {
            fail(path, format!("port {port} is already used by `{first}`"))?;
        }
        Ok(())
    };
    for (i, ib) in n.inbound.iter().enumerate() {
        let p = format!("networking.inbound[{i}]");
        validate_port(&format!("{p}.port"), ib.port)?;
        if let Some(sp) = ib.service_port {
            validate_port(&format!("{p}.servicePort"), sp)?;
        }
        if let Some(a) = &ib.service_address {
            validate_ip(&format!("{p}.serviceAddress"), a)?;
        }
        if let Some(a) = &ib.address {
            validate_ip(&format!("{p}.address"), a)?;
        }
        validate_tags(&format!("{p}.tags"), &ib.tags, true)?;
        if let Some(service) = ib.tags.get(SERVICE_TAG) {
            validate_service_name(&format!("{p}.tags.{SERVICE_TAG}"), service)?;
        }
        claim(format!("{p}.port"), ib.port)?;
    }
    for (i, ob) in n.outbound.iter().enumerate() {
        let p = format!("networking.outbound[{i}]");
        validate_port(&format!("{p}.port"), ob.port)?;
        if let Some(a) = &ob.address {
            validate_ip(&format!("{p}.address"), a)?;
        }
        validate_tags(&format!("{p}.tags"), &ob.tags, true)?;
        claim(format!("{p}.port"), ob.port)?;
    }
    if let Some(tp) = &n.transparent_proxying {
        let p = "networking.transparentProxying";
        for (field, port) in [
            ("redirectPortInbound", tp.redirect_port_inbound),
            ("redirectPortOutbound", tp.redirect_port_outbound),
        ] {
            if let Some(port) = port {
                validate_port(&format!("{p}.{field}"), port)?;
                claim(format!("{p}.{field}"), port)?;
            }
        }
    }
    Ok(())
}

/// Whether two textual IPs are the same address (`::1` and `0:0::1` are).
fn same_ip(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Refuses tags other than the service (a `*` value narrows nothing, so it may stay): weft
/// would otherwise ignore them without a word.
fn only_service_tag(path: &str, tags: &Tags, why: &str) -> Result {
    if let Some((tag, _)) = tags.iter().find(|(k, v)| *k != SERVICE_TAG && *v != "*") {
        fail(
            format!("{path}.{tag}"),
            format!("{why}: select it by `{SERVICE_TAG}` only"),
        )?;
    }
    Ok(())
}

fn validate_selectors(path: &str, selectors: &[Selector], need_service: bool) -> Result {
    if selectors.is_empty() {
        fail(path, "at least one selector is required")?;
    }
    for (i, s) in selectors.iter().enumerate() {
        let p = format!("{path}[{i}].match");
        if s.tags.is_empty() {
            fail(&p, "a selector needs at least one tag")?;
        }
        validate_tags(&p, &s.tags, need_service)?;
    }
    Ok(())
}

/// A caller is known by its certificate, which names its service only: a source that selects
/// by other tags could never match, and, as the inbound's one TrafficPermission, would deny
/// every caller without a word.
fn validate_permission_sources(sources: &[Selector]) -> Result {
    for (i, s) in sources.iter().enumerate() {
        let path = format!("sources[{i}].match");
        if !s.tags.contains_key(SERVICE_TAG) {
            fail(
                &path,
                format!("callers are told apart by service only: select them by `{SERVICE_TAG}`"),
            )?;
        }
        only_service_tag(
            &path,
            &s.tags,
            "callers are told apart by service only (their certificates name their service)",
        )?;
    }
    Ok(())
}

fn validate_splits(path: &str, split: &[Split], destination: Option<&Tags>) -> Result {
    match (split.is_empty(), destination) {
        (true, None) => fail(path, "either `split` or `destination` is required")?,
        (false, Some(_)) => fail(
            format!("{path}.destination"),
            "give either `split` or `destination`, not both",
        )?,
        _ => {}
    }
    if let Some(d) = destination {
        validate_tags(&format!("{path}.destination"), d, true)?;
    }
    if !split.is_empty() && split.iter().all(|s| s.weight == 0) {
        fail(
            format!("{path}.split"),
            "at least one weight must be greater than zero",
        )?;
    }
    for (i, s) in split.iter().enumerate() {
        validate_tags(
            &format!("{path}.split[{i}].destination"),
            &s.destination,
            true,
        )?;
    }
    Ok(())
}

fn validate_string_match(path: &str, m: &StringMatch) -> Result {
    let set = [m.prefix.is_some(), m.exact.is_some(), m.regex.is_some()];
    if set.iter().filter(|x| **x).count() != 1 {
        fail(
            path,
            "exactly one of `prefix`, `exact` or `regex` is required",
        )?;
    }
    if let Some(re) = &m.regex {
        validate_regex(&format!("{path}.regex"), re)?;
    }
    Ok(())
}

fn validate_regex(path: &str, re: &str) -> Result {
    match regex::Regex::new(re) {
        Ok(_) => Ok(()),
        Err(e) => fail(path, format!("invalid regular expression: {e}")),
    }
}

fn validate_method(path: &str, method: &str) -> Result {
    if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
        fail(
            path,
            format!("{method:?} is not an HTTP method (upper-case letters, e.g. GET)"),
        )?;
    }
    Ok(())
}

fn validate_traffic_route(r: &TrafficRouteSpec) -> Result {
    validate_selectors("sources", &r.sources, false)?;
    validate_selectors("destinations", &r.destinations, true)?;
    validate_splits("conf", &r.conf.split, r.conf.destination.as_ref())?;
    for (i, h) in r.conf.http.iter().enumerate() {
        let p = format!("conf.http[{i}]");
        let m = &h.matcher;
        if m.method.is_none() && m.path.is_none() && m.headers.is_empty() {
            fail(
                format!("{p}.match"),
                "needs at least one of `method`, `path` or `headers`",
            )?;
        }
        if let Some(method) = &m.method {
            let mp = format!("{p}.match.method");
            match method.exact() {
                Some(name) => validate_method(&mp, name)?,
                None => fail(mp, "only `exact` method matches are supported")?,
            }
        }
        if let Some(path) = &m.path {
            validate_string_match(&format!("{p}.match.path"), path)?;
        }
        for (name, hm) in &m.headers {
            validate_string_match(&format!("{p}.match.headers.{name}"), hm)?;
        }
        validate_splits(&p, &h.split, h.destination.as_ref())?;
    }
    if let Some(lb) = &r.conf.load_balancer {
        let set = [
            lb.round_robin.is_some(),
            lb.least_request.is_some(),
            lb.random.is_some(),
        ];
        if set.iter().filter(|x| **x).count() != 1 {
            fail(
                "conf.loadBalancer",
                "exactly one of `roundRobin`, `leastRequest` or `random` is required",
            )?;
        }
        if let Some(c) = lb.least_request.as_ref().and_then(|l| l.choice_count)
            && c < 2
        {
            fail(
                "conf.loadBalancer.leastRequest.choiceCount",
                "must be at least 2",
            )?;
        }
    }
    Ok(())
}

fn validate_target_ref(path: &str, t: &TargetRef, allowed: &[TargetKind]) -> Result {
    if !allowed.contains(&t.kind) {
        let names: Vec<String> = allowed.iter().map(|k| format!("{k:?}")).collect();
        fail(
            format!("{path}.kind"),
            format!(
                "{:?} is not allowed here, expected one of {}",
                t.kind,
                names.join(", ")
            ),
        )?;
    }
    let needs_name = matches!(
        t.kind,
        TargetKind::MeshService
            | TargetKind::MeshServiceSubset
            | TargetKind::Dataplane
            | TargetKind::MeshHttpRoute
    );
    match (&t.name, needs_name) {
        (None, true) => fail(
            format!("{path}.name"),
            format!("required for kind {:?}", t.kind),
        )?,
        (Some(_), false) => fail(
            format!("{path}.name"),
            format!("not allowed for kind {:?}", t.kind),
        )?,
        (Some(n), true) if n.is_empty() => fail(format!("{path}.name"), "must not be empty")?,
        _ => {}
    }
    let needs_tags = matches!(
        t.kind,
        TargetKind::MeshSubset | TargetKind::MeshServiceSubset
    );
    if needs_tags && t.tags.is_empty() {
        fail(
            format!("{path}.tags"),
            format!("required for kind {:?}", t.kind),
        )?;
    }
    if !needs_tags && !t.tags.is_empty() {
        fail(
            format!("{path}.tags"),
            format!("not allowed for kind {:?}", t.kind),
        )?;
    }
    validate_tags(&format!("{path}.tags"), &t.tags, false)
}

const TOP_KINDS: [TargetKind; 5] = [
    TargetKind::Mesh,
    TargetKind::MeshSubset,
    TargetKind::MeshService,
    TargetKind::MeshServiceSubset,
    TargetKind::Dataplane,
];

fn validate_mtp(p: &MeshTrafficPermissionSpec) -> Result {
    validate_target_ref("spec.targetRef", &p.target_ref, &TOP_KINDS)?;
    if p.from.is_empty() {
        fail("spec.from", "at least one `from` entry is required")?;
    }
    for (i, f) in p.from.iter().enumerate() {
        let path = format!("spec.from[{i}].targetRef");
        validate_target_ref(&path, &f.target_ref, &TOP_KINDS[..4])?;
        // A caller is known by its certificate, which names its service only: a `from` that
        // selects by other tags could never match, and a Deny would silently do nothing.
        if let Some(tag) = f
            .target_ref
            .tags
            .keys()
            .find(|k| k.as_str() != crate::dataplane::SERVICE_TAG)
        {
            fail(
                format!("{path}.tags.{tag}"),
                format!(
                    "callers are told apart by service only (their certificates name their \
                     `{}`); select them by it",
                    crate::dataplane::SERVICE_TAG
                ),
            )?;
        }
    }
    Ok(())
}

fn validate_mesh_http_route(r: &MeshHttpRouteSpec) -> Result {
    validate_target_ref("spec.targetRef", &r.target_ref, &TOP_KINDS)?;
    if r.to.is_empty() {
        fail("spec.to", "at least one `to` entry is required")?;
    }
    for (i, to) in r.to.iter().enumerate() {
        let p = format!("spec.to[{i}]");
        validate_target_ref(
            &format!("{p}.targetRef"),
            &to.target_ref,
            &[TargetKind::MeshService],
        )?;
        if to.rules.is_empty() {
            fail(format!("{p}.rules"), "at least one rule is required")?;
        }
        for (j, rule) in to.rules.iter().enumerate() {
            let rp = format!("{p}.rules[{j}]");
            if rule.matches.is_empty() {
                fail(format!("{rp}.matches"), "at least one match is required")?;
            }
            for (k, m) in rule.matches.iter().enumerate() {
                let mp = format!("{rp}.matches[{k}]");
                if let Some(path) = &m.path {
                    match path.kind {
                        PathMatchType::RegularExpression => {
                            validate_regex(&format!("{mp}.path.value"), &path.value)?;
                        }
                        _ if !path.value.starts_with('/') => fail(
                            format!("{mp}.path.value"),
                            format!("{:?} must start with '/'", path.value),
                        )?,
                        _ => {}
                    }
                }
                if let Some(method) = &m.method {
                    validate_method(&format!("{mp}.method"), method)?;
                }
                for (h, hm) in m.headers.iter().enumerate() {
                    let hp = format!("{mp}.headers[{h}]");
                    if hm.name.is_empty() {
                        fail(format!("{hp}.name"), "must not be empty")?;
                    }
                    let needs_value = !matches!(
                        hm.kind,
                        Some(HeaderMatchType::Present | HeaderMatchType::Absent)
                    );
                    if needs_value && hm.value.is_none() {
                        fail(format!("{hp}.value"), "required for this match type")?;
                    }
                    if let (Some(HeaderMatchType::RegularExpression), Some(v)) =
                        (hm.kind, &hm.value)
                    {
                        validate_regex(&format!("{hp}.value"), v)?;
                    }
                }
            }
            for (k, f) in rule.default.filters.iter().enumerate() {
                let fp = format!("{rp}.default.filters[{k}]");
                let (want, other) = match f.kind {
                    HttpFilterType::RequestHeaderModifier => {
                        (&f.request_header_modifier, &f.response_header_modifier)
                    }
                    HttpFilterType::ResponseHeaderModifier => {
                        (&f.response_header_modifier, &f.request_header_modifier)
                    }
                };
                if want.is_none() || other.is_some() {
                    fail(
                        &fp,
                        format!("a {:?} filter needs exactly its own modifier field", f.kind),
                    )?;
                }
            }
            if rule.default.backend_refs.is_empty() {
                fail(
                    format!("{rp}.default.backendRefs"),
                    "at least one backendRef is required",
                )?;
            }
            for (k, b) in rule.default.backend_refs.iter().enumerate() {
                let bp = format!("{rp}.default.backendRefs[{k}]");
                match b.kind {
                    TargetKind::MeshService if !b.tags.is_empty() => fail(
                        format!("{bp}.tags"),
                        "not allowed for kind MeshService; use MeshServiceSubset",
                    )?,
                    TargetKind::MeshServiceSubset if b.tags.is_empty() => {
                        fail(format!("{bp}.tags"), "required for kind MeshServiceSubset")?
                    }
                    TargetKind::MeshService | TargetKind::MeshServiceSubset => {}
                    other => fail(
                        format!("{bp}.kind"),
                        format!(
                            "{other:?} is not allowed, expected MeshService or MeshServiceSubset"
                        ),
                    )?,
                }
                if b.name.is_empty() {
                    fail(format!("{bp}.name"), "must not be empty")?;
                }
                validate_tags(&format!("{bp}.tags"), &b.tags, false)?;
            }
            if rule
                .default
                .backend_refs
                .iter()
                .all(|b| b.weight == Some(0))
            {
                fail(
                    format!("{rp}.default.backendRefs"),
                    "at least one weight must be greater than zero",
                )?;
            }
        }
    }
    Ok(())
}
