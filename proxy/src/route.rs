//! Where a call to a mesh service goes: its HTTP rules (TrafficRoute and MeshHTTPRoute,
//! resolved by the control plane for this proxy as the source), the weighted endpoint subsets
//! each rule or the default route sends to, and the balancer within a subset.
//!
//! Rules are tried in order and the first match wins; no match takes the default route. A
//! subset is chosen by weight with a deterministic rotation (a 90/10 split is exactly 90/10
//! over every 100 calls), then an endpoint within it by the service's [`LbKind`].

use crate::balance::{Balancer, EndpointState, EndpointStates, LbKind};
use crate::detect::Protocol;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use weft_api::proto::{self as pb, string_match::Kind as StringKind};

/// The tag that names a service.
pub const SERVICE_TAG: &str = "kuma.io/service";

/// A subset of endpoints traffic may go to, with its share of the traffic.
#[derive(Debug)]
pub struct Subset {
    /// The relative weight of this subset.
    pub weight: u32,
    /// The service the endpoints belong to (a route may send traffic to another service).
    pub service: String,
    /// The healthy endpoints carrying the subset's tags.
    pub balancer: Balancer,
}

/// Weighted subsets; the ones with no endpoint are left out, and their share goes to the
/// others (as Linkerd's traffic split does; Envoy answers 503 for it).
#[derive(Debug, Default)]
pub struct Destinations {
    subsets: Vec<Subset>,
    total_weight: u64,
    next: AtomicUsize,
    /// Some destination was given (with a weight), whether or not it has endpoints.
    configured: bool,
}

impl Destinations {
    /// Whether the policy named any destination. A rule that names none sends to the
    /// service's default route; one whose destinations have no endpoint sends nowhere.
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Whether no subset has an endpoint.
    pub fn is_empty(&self) -> bool {
        self.subsets.is_empty()
    }

    /// The subsets.
    pub fn subsets(&self) -> &[Subset] {
        &self.subsets
    }

    /// Chooses a subset by weight.
    pub fn choose(&self) -> Option<&Subset> {
        match self.subsets.len() {
            0 => None,
            1 => self.subsets.first(),
            _ => {
                if self.total_weight == 0 {
                    return None;
                }
                let mut at = (self.next.fetch_add(1, Ordering::Relaxed) as u64) % self.total_weight;
                for s in &self.subsets {
                    if at < u64::from(s.weight) {
                        return Some(s);
                    }
                    at -= u64::from(s.weight);
                }
                self.subsets.last()
            }
        }
    }
}

/// How a string (path or header value) is matched.
#[derive(Debug)]
pub enum StrMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Matches the whole regular expression.
    Regex(regex::Regex),
}

impl StrMatch {
    fn from_pb(m: &pb::StringMatch, field: &str) -> Result<Option<Self>, String> {
        Ok(match &m.kind {
            None => None,
            Some(StringKind::Exact(v)) => Some(StrMatch::Exact(v.clone())),
            Some(StringKind::Prefix(v)) => Some(StrMatch::Prefix(v.clone())),
            Some(StringKind::Regex(v)) => Some(StrMatch::Regex(
                regex::Regex::new(&format!("^(?:{v})$"))
                    .map_err(|e| format!("{field}: bad regex {v:?}: {e}"))?,
            )),
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(v) => value == v,
            StrMatch::Prefix(v) => value.starts_with(v.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// One header condition.
#[derive(Debug)]
pub struct HeaderMatch {
    name: HeaderName,
    value: Option<StrMatch>,
    absent: bool,
}

/// The request conditions of a rule; all must hold.
#[derive(Debug, Default)]
pub struct RequestMatch {
    path: Option<StrMatch>,
    method: Option<Method>,
    headers: Vec<HeaderMatch>,
}

impl RequestMatch {
    /// Whether a request with this method, path and headers matches.
    pub fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if self.path.as_ref().is_some_and(|p| !p.matches(path)) {
            return false;
        }
        self.headers.iter().all(|h| {
            let mut values = headers.get_all(&h.name).iter();
            if h.absent {
                return values.next().is_none();
            }
            match &h.value {
                None => values.next().is_some(),
                Some(m) => values.any(|v| v.to_str().is_ok_and(|v| m.matches(v))),
            }
        })
    }
}

/// Header changes a rule makes to requests or responses.
#[derive(Debug, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    fn from_pb(m: Option<&pb::HeaderModifier>, field: &str) -> Result<Self, String> {
        let Some(m) = m else {
            return Ok(Self::default());
        };
        // A route written before the control plane refused them may still name a header
        // that frames or routes the message: it is left out, not applied (h2 would refuse
        // every request it matched), and the rest of the configuration stands.
        let allowed = |name: &str| {
            let ok = !weft_api::validate::is_reserved_header(name);
            if !ok {
                tracing::warn!(
                    field,
                    header = name,
                    "a route's header modifier names a reserved header: ignored"
                );
            }
            ok
        };
        let pair = |v: &pb::HeaderValue| -> Result<(HeaderName, HeaderValue), String> {
            let name = HeaderName::try_from(v.name.as_str())
                .map_err(|_| format!("{field}: {:?} is not a header name", v.name))?;
            let value = HeaderValue::try_from(v.value.as_str())
                .map_err(|_| format!("{field}: {:?} is not a header value", v.value))?;
            Ok((name, value))
        };
        Ok(Self {
            set: m
                .set
                .iter()
                .filter(|v| allowed(&v.name))
                .map(pair)
                .collect::<Result<_, _>>()?,
            add: m
                .add
                .iter()
                .filter(|v| allowed(&v.name))
                .map(pair)
                .collect::<Result<_, _>>()?,
            remove: m
                .remove
                .iter()
                .filter(|n| allowed(n))
                .map(|n| {
                    HeaderName::try_from(n.as_str())
                        .map_err(|_| format!("{field}: {n:?} is not a header name"))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the changes: remove, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// One HTTP rule of a service.
#[derive(Debug)]
pub struct HttpRule {
    /// When it applies.
    pub matcher: RequestMatch,
    /// Where it sends; none configured means the service's default route (a rule that only
    /// modifies headers).
    pub destinations: Destinations,
    /// Changes to the request.
    pub request_headers: HeaderModifier,
    /// Changes to the response.
    pub response_headers: HeaderModifier,
    /// The policy it comes from.
    pub origin: String,
}

/// A mesh service as a client of it sees it.
#[derive(Debug)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// The protocol all its endpoints declare; `None` means detect.
    pub protocol: Option<Protocol>,
    /// HTTP rules, first match wins.
    pub http_rules: Vec<HttpRule>,
    /// Where traffic goes when no rule matches (and all TCP traffic).
    pub default_route: Destinations,
}

/// The endpoint a call goes to, with the service it must prove to be.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The service the endpoint belongs to.
    pub service: &'a str,
    /// The endpoint.
    pub endpoint: &'a Arc<EndpointState>,
}

impl Service {
    /// Picks an endpoint on the default route (TCP traffic), skipping `exclude`.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Target<'_>> {
        pick_in(&self.default_route, exclude)
    }

    /// The first rule matching the request, if any.
    pub fn rule_for(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<&HttpRule> {
        self.http_rules
            .iter()
            .find(|r| r.matcher.matches(method, path, headers))
    }

    /// Picks an endpoint for a request the rule `rule` (or none) matched, skipping `exclude`.
    pub fn pick_for<'a>(
        &'a self,
        rule: Option<&'a HttpRule>,
        exclude: &[SocketAddr],
    ) -> Option<Target<'a>> {
        match rule {
            // A rule whose destinations have no endpoint does not fall back to the default
            // route: that may be another service or version than the rule asked for (a
            // `/admin` rule to `admin`), so the request fails (503) as Envoy's does.
            Some(r) if r.destinations.is_configured() => pick_in(&r.destinations, exclude),
            _ => pick_in(&self.default_route, exclude),
        }
    }
}

fn pick_in<'a>(dests: &'a Destinations, exclude: &[SocketAddr]) -> Option<Target<'a>> {
    let subset = dests.choose()?;
    let endpoint = subset
        .balancer
        .pick(exclude)
        // This subset has nothing left to try: another subset may.
        .or_else(|| {
            dests
                .subsets
                .iter()
                .find_map(|s| s.balancer.pick(exclude).map(|e| (s, e)))
                .map(|(_, e)| e)
        })?;
    let service = dests
        .subsets
        .iter()
        .find(|s| {
            s.balancer
                .endpoints()
                .iter()
                .any(|e| Arc::ptr_eq(e, endpoint))
        })
        .map_or(subset.service.as_str(), |s| s.service.as_str());
    Some(Target { service, endpoint })
}

/// The healthy endpoints of one service, with their tags.
pub(crate) type EndpointsByService<'a> = HashMap<&'a str, Vec<(SocketAddr, &'a pb::Endpoint)>>;

/// Builds a service from its snapshot entry. Errors name the field.
pub(crate) fn build_service(
    out: &pb::OutboundService,
    field: &str,
    endpoints: &EndpointsByService<'_>,
    states: &EndpointStates,
) -> Result<Service, String> {
    let lb = match out.load_balancer.as_ref() {
        Some(l) => match l.kind() {
            pb::load_balancer::Kind::RoundRobin => LbKind::RoundRobin,
            pb::load_balancer::Kind::Random => LbKind::Random,
            pb::load_balancer::Kind::LeastRequest => LbKind::LeastRequest {
                choices: l.choice_count.max(2),
            },
            pb::load_balancer::Kind::P2cEwma => LbKind::P2cEwma,
        },
        None => LbKind::P2cEwma,
    };
    let destinations = |dests: &[pb::WeightedDestination]| {
        let mut subsets = Vec::new();
        for dest in dests.iter().filter(|d| d.weight > 0) {
            let target = dest
                .tags
                .get(SERVICE_TAG)
                .cloned()
                .unwrap_or_else(|| out.service.clone());
            let eps: Vec<Arc<EndpointState>> = endpoints
                .get(target.as_str())
                .map(|eps| {
                    eps.iter()
                        .filter(|(_, ep)| ep.healthy)
                        .filter(|(_, ep)| {
                            dest.tags.iter().all(|(k, v)| {
                                k == SERVICE_TAG || ep.tags.get(k).is_some_and(|t| t == v)
                            })
                        })
                        .map(|(sa, _)| states.get(*sa))
                        .collect()
                })
                .unwrap_or_default();
            if eps.is_empty() {
                continue;
            }
            subsets.push(Subset {
                weight: dest.weight,
                service: target,
                balancer: Balancer::new(lb, eps),
            });
        }
        let total_weight = subsets.iter().map(|s| u64::from(s.weight)).sum();
        Destinations {
            subsets,
            total_weight,
            next: AtomicUsize::new(0),
            configured: dests.iter().any(|d| d.weight > 0),
        }
    };
    let default_route = if out.default_route.is_empty() {
        destinations(&[pb::WeightedDestination {
            weight: 1,
            tags: [(SERVICE_TAG.to_string(), out.service.clone())].into(),
        }])
    } else {
        destinations(&out.default_route)
    };
    let mut http_rules = Vec::with_capacity(out.http_rules.len());
    for (i, rule) in out.http_rules.iter().enumerate() {
        let f = format!("{field}.http_rules[{i}]");
        let m = rule.r#match.clone().unwrap_or_default();
        let method = match m.method.as_str() {
            "" => None,
            v => Some(
                Method::from_bytes(v.as_bytes())
                    .map_err(|_| format!("{f}.match.method: {v:?} is not a method"))?,
            ),
        };
        let path = match &m.path {
            Some(p) => StrMatch::from_pb(p, &format!("{f}.match.path"))?,
            None => None,
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (j, h) in m.headers.iter().enumerate() {
            let hf = format!("{f}.match.headers[{j}]");
            let name = HeaderName::try_from(h.name.as_str())
                .map_err(|_| format!("{hf}.name: {:?} is not a header name", h.name))?;
            let value = match &h.value {
                Some(v) if !h.present && !h.absent => StrMatch::from_pb(v, &hf)?,
                _ => None,
            };
            headers.push(HeaderMatch {
                name,
                value,
                absent: h.absent,
            });
        }
        http_rules.push(HttpRule {
            matcher: RequestMatch {
                path,
                method,
                headers,
            },
            destinations: destinations(&rule.destinations),
            request_headers: HeaderModifier::from_pb(
                rule.request_headers.as_ref(),
                &format!("{f}.request_headers"),
            )?,
            response_headers: HeaderModifier::from_pb(
                rule.response_headers.as_ref(),
                &format!("{f}.response_headers"),
            )?,
            origin: rule.origin.clone(),
        });
    }
    Ok(Service {
        name: out.service.clone(),
        protocol: crate::config::protocol_hint(&out.protocol).unwrap_or(None),
        http_rules,
        default_route,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_headers_of_an_old_route_are_left_out_and_the_rest_applied() {
        let pair = |name: &str, value: &str| pb::HeaderValue {
            name: name.into(),
            value: value.into(),
        };
        let m = pb::HeaderModifier {
            set: vec![pair("Transfer-Encoding", "gzip"), pair("x-set", "1")],
            add: vec![pair("host", "elsewhere"), pair("x-add", "2")],
            remove: vec!["connection".into(), "x-gone".into()],
        };
        let m = HeaderModifier::from_pb(Some(&m), "rule").expect("the rest is applied");
        let mut h = HeaderMap::new();
        h.insert("x-gone", HeaderValue::from_static("x"));
        h.insert("connection", HeaderValue::from_static("keep"));
        m.apply(&mut h);
        assert_eq!(h.get("x-set").map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert_eq!(h.get("x-add").map(|v| v.as_bytes()), Some(&b"2"[..]));
        assert!(!h.contains_key("x-gone"));
        assert!(!h.contains_key("transfer-encoding") && !h.contains_key("host"));
        assert!(
            h.contains_key("connection"),
            "a reserved remove is left out too"
        );
    }

    fn ep(addr: &str, version: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: addr.into(),
            port: 80,
            tags: [
                (SERVICE_TAG.to_string(), "api".to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into(),
            healthy: true,
            dataplane: String::new(),
        }
    }

    fn dest(weight: u32, version: &str) -> pb::WeightedDestination {
        pb::WeightedDestination {
            weight,
            tags: [
                (SERVICE_TAG.to_string(), "api".to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into(),
        }
    }

    fn service(out: &pb::OutboundService) -> Service {
        let eps: Vec<pb::Endpoint> = out.endpoints.clone();
        let mut by: EndpointsByService<'_> = HashMap::new();
        for e in &eps {
            let sa = SocketAddr::new(e.address.parse().unwrap(), 80);
            by.entry("api").or_default().push((sa, e));
        }
        build_service(out, "outbounds[0]", &by, &EndpointStates::default()).unwrap()
    }

    fn sample() -> pb::OutboundService {
        pb::OutboundService {
            service: "api".into(),
            endpoints: vec![ep("10.0.0.1", "v1"), ep("10.0.0.2", "v2")],
            default_route: vec![dest(90, "v1"), dest(10, "v2")],
            http_rules: vec![pb::HttpRule {
                r#match: Some(pb::HttpMatch {
                    path: Some(pb::StringMatch {
                        kind: Some(StringKind::Prefix("/beta".into())),
                    }),
                    method: "GET".into(),
                    headers: vec![pb::HeaderMatch {
                        name: "x-user".into(),
                        value: Some(pb::StringMatch {
                            kind: Some(StringKind::Regex("tester-[0-9]+".into())),
                        }),
                        present: false,
                        absent: false,
                    }],
                }),
                destinations: vec![dest(1, "v2")],
                request_headers: Some(pb::HeaderModifier {
                    set: vec![pb::HeaderValue {
                        name: "x-routed".into(),
                        value: "beta".into(),
                    }],
                    ..Default::default()
                }),
                response_headers: None,
                origin: "MeshHTTPRoute/beta".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn weights_split_exactly_over_a_cycle() {
        let svc = service(&sample());
        let v2 = (0..1000)
            .filter(|_| svc.pick(&[]).unwrap().endpoint.addr.ip().to_string() == "10.0.0.2")
            .count();
        assert_eq!(v2, 100);
    }

    #[test]
    fn rules_match_path_method_and_headers() {
        let svc = service(&sample());
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("tester-7"));
        let rule = svc.rule_for(&Method::GET, "/beta/x", &h).unwrap();
        assert_eq!(rule.origin, "MeshHTTPRoute/beta");
        let t = svc.pick_for(Some(rule), &[]).unwrap();
        assert_eq!(t.endpoint.addr.ip().to_string(), "10.0.0.2");
        let mut req = HeaderMap::new();
        rule.request_headers.apply(&mut req);
        assert_eq!(req["x-routed"], "beta");

        assert!(svc.rule_for(&Method::POST, "/beta/x", &h).is_none());
        assert!(svc.rule_for(&Method::GET, "/alpha", &h).is_none());
        h.insert("x-user", HeaderValue::from_static("tester-x"));
        assert!(
            svc.rule_for(&Method::GET, "/beta", &h).is_none(),
            "the regex must match the whole value"
        );
    }

    #[test]
    fn a_failed_endpoint_is_not_tried_twice() {
        let mut out = sample();
        out.default_route = vec![dest(1, "v1"), dest(1, "v2")];
        let svc = service(&out);
        let first = svc.pick(&[]).unwrap().endpoint.addr;
        for _ in 0..10 {
            let next = svc.pick(&[first]).unwrap().endpoint.addr;
            assert_ne!(next, first);
        }
        let both = [first, svc.pick(&[first]).unwrap().endpoint.addr];
        assert!(svc.pick(&both).is_none());
    }

    #[test]
    fn a_subset_without_endpoints_gives_its_share_to_the_others_of_its_rule() {
        let mut out = sample();
        out.endpoints = vec![ep("10.0.0.1", "v1")];
        let svc = service(&out);
        for _ in 0..20 {
            let t = svc.pick(&[]).expect("v1 takes v2's share");
            assert_eq!(t.endpoint.addr.ip().to_string(), "10.0.0.1");
        }
        // The rule sends to v2 only, which has no endpoint: nowhere, not the default route.
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("tester-7"));
        let rule = svc.rule_for(&Method::GET, "/beta/x", &h).expect("matches");
        assert!(svc.pick_for(Some(rule), &[]).is_none());
        // A rule without destinations (headers only) takes the default route.
        out.http_rules[0].destinations.clear();
        let svc = service(&out);
        let rule = svc.rule_for(&Method::GET, "/beta/x", &h).expect("matches");
        let t = svc.pick_for(Some(rule), &[]).expect("the default route");
        assert_eq!(t.endpoint.addr.ip().to_string(), "10.0.0.1");
    }

    #[test]
    fn bad_rules_name_their_field() {
        let mut out = sample();
        out.http_rules[0].r#match.as_mut().unwrap().headers[0].name = "bad header".into();
        let by = HashMap::new();
        let e = build_service(&out, "outbounds[3]", &by, &EndpointStates::default()).unwrap_err();
        assert!(
            e.contains("outbounds[3].http_rules[0].match.headers[0].name"),
            "{e}"
        );
    }
}
