//! Routes as a source proxy sees them. Which routes apply to a proxy depends only on which
//! routing policies select it as the source (its [`RouteClass`]); proxies of one class get
//! the same outbound services, so those are built once per class and view.

use super::super::view::MeshView;
use super::permissions::{specificity, target_selects};
use weft_api::DataplaneSpec;
use weft_api::dataplane::SERVICE_TAG;
use weft_api::policy::{HeaderMatchType, HttpFilterType, PathMatchType, Selector, Tags};
use weft_api::proto::{self as pb, string_match};

/// The routing policies that select a proxy as the source, as positions in the view's
/// (name-ordered) maps. Equal classes mean equal routes to every service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RouteClass {
    /// MeshHTTPRoutes whose top-level targetRef selects the proxy.
    mesh_http_routes: Vec<usize>,
    /// TrafficRoutes whose sources match one of the proxy's inbounds.
    traffic_routes: Vec<usize>,
}

impl RouteClass {
    /// The class of dataplane `dp_name` in `view`.
    pub fn of(dp_name: &str, dp: &DataplaneSpec, view: &MeshView) -> RouteClass {
        let own_tags: Vec<&Tags> = dp.networking.inbound.iter().map(|ib| &ib.tags).collect();
        RouteClass {
            mesh_http_routes: view
                .mesh_http_routes
                .values()
                .enumerate()
                .filter(|(_, r)| {
                    own_tags
                        .iter()
                        .any(|t| target_selects(&r.target_ref, dp_name, t))
                })
                .map(|(i, _)| i)
                .collect(),
            traffic_routes: view
                .traffic_routes
                .values()
                .enumerate()
                .filter(|(_, r)| selectors_match(&r.sources, &own_tags))
                .map(|(i, _)| i)
                .collect(),
        }
    }
}

/// `service` as proxies of `class` reach it: load balancer, HTTP rules and default route,
/// with no endpoints (those are the same for every source).
pub fn outbound(
    service: &str,
    protocol: &str,
    class: &RouteClass,
    view: &MeshView,
) -> pb::OutboundService {
    let mut out = pb::OutboundService {
        service: service.into(),
        protocol: protocol.into(),
        endpoints: Vec::new(),
        load_balancer: Some(pb::LoadBalancer::default()),
        http_rules: mesh_http_route_rules(class, service, view),
        default_route: vec![destination(1, service, &Tags::new())],
    };
    // As in Kuma, a MeshHTTPRoute takes priority over a TrafficRoute for the traffic both
    // target; the two are not merged.
    if out.http_rules.is_empty() {
        apply_traffic_route(&mut out, class, view);
    }
    out
}

/// The entries of `map` at `positions` (ascending), in map order.
fn picked<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    positions: &'a [usize],
) -> impl Iterator<Item = (&'a String, &'a V)> {
    map.iter()
        .enumerate()
        .filter(|(i, _)| positions.binary_search(i).is_ok())
        .map(|(_, kv)| kv)
}

fn destination(weight: u32, service: &str, tags: &Tags) -> pb::WeightedDestination {
    let mut t = tags.clone();
    t.insert(SERVICE_TAG.into(), service.into());
    pb::WeightedDestination { weight, tags: t }
}

/// A TrafficRoute destination's tags for a request to `service`: `*` is a wildcard, as in
/// Kuma's `route-all` (`kuma.io/service: '*'` is the service the request is for; any other
/// tag `*` narrows nothing).
fn destination_tags(tags: &Tags, service: &str) -> Tags {
    tags.iter()
        .filter_map(|(k, v)| match (k.as_str(), v.as_str()) {
            (SERVICE_TAG, "*") => Some((k.clone(), service.to_string())),
            (_, "*") => None,
            _ => Some((k.clone(), v.clone())),
        })
        .collect()
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

/// Applies the most specific TrafficRoute whose sources match this proxy (its class) and
/// whose destinations match the service.
fn apply_traffic_route(out: &mut pb::OutboundService, class: &RouteClass, view: &MeshView) {
    let mut service_tags = Tags::new();
    service_tags.insert(SERVICE_TAG.into(), out.service.clone());
    let best = picked(&view.traffic_routes, &class.traffic_routes)
        .filter(|(_, r)| r.destinations.iter().any(|d| d.matches(&service_tags)))
        .max_by(|(an, a), (bn, b)| {
            let ka = selector_specificity(&a.sources) + selector_specificity(&a.destinations);
            let kb = selector_specificity(&b.sources) + selector_specificity(&b.destinations);
            ka.cmp(&kb).then_with(|| bn.cmp(an))
        });
    let Some((name, route)) = best else { return };
    let service = out.service.clone();
    let to_dests =
        |split: &[weft_api::policy::Split], dest: Option<&Tags>| -> Vec<pb::WeightedDestination> {
            match dest {
                Some(d) => vec![pb::WeightedDestination {
                    weight: 1,
                    tags: destination_tags(d, &service),
                }],
                None => split
                    .iter()
                    .map(|s| pb::WeightedDestination {
                        weight: s.weight,
                        tags: destination_tags(&s.destination, &service),
                    })
                    .collect(),
            }
        };
    for h in &route.conf.http {
        let m = &h.matcher;
        out.http_rules.push(pb::HttpRule {
            r#match: Some(pb::HttpMatch {
                path: m.path.as_ref().map(string_match_of),
                method: m
                    .method
                    .as_ref()
                    .and_then(|m| m.exact())
                    .unwrap_or_default()
                    .to_string(),
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

/// The MeshHTTPRoute rules for calls from proxies of `class` to `service`, most specific
/// policy first.
fn mesh_http_route_rules(class: &RouteClass, service: &str, view: &MeshView) -> Vec<pb::HttpRule> {
    let mut routes: Vec<(&String, &weft_api::policy::MeshHttpRouteSpec)> =
        picked(&view.mesh_http_routes, &class.mesh_http_routes).collect();
    routes.sort_by(|(an, a), (bn, b)| {
        specificity(b.target_ref.kind)
            .cmp(&specificity(a.target_ref.kind))
            .then_with(|| an.cmp(bn))
    });
    let mut rules: Vec<(MatchRank, pb::HttpRule)> = Vec::new();
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
                            PathMatchType::PathPrefix => path_prefix(&p.value),
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
                    let rank = MatchRank {
                        path: m.path.as_ref().map_or((0, 0), |p| match p.kind {
                            PathMatchType::Exact => (3, p.value.len()),
                            PathMatchType::PathPrefix => (2, p.value.trim_end_matches('/').len()),
                            PathMatchType::RegularExpression => (1, 0),
                        }),
                        method: m.method.is_some(),
                        headers: m.headers.len(),
                    };
                    rules.push((
                        rank,
                        pb::HttpRule {
                            r#match: Some(pb::HttpMatch {
                                path,
                                method: m.method.clone().unwrap_or_default(),
                                headers,
                            }),
                            destinations: destinations.clone(),
                            request_headers: modifier(HttpFilterType::RequestHeaderModifier),
                            response_headers: modifier(HttpFilterType::ResponseHeaderModifier),
                            origin: format!("MeshHTTPRoute/{name}"),
                        },
                    ));
                }
            }
        }
    }
    // The proxy takes the first rule that matches, so the rules go in Gateway API's order of
    // precedence, as Kuma sorts them: an exact path before a prefix, a longer prefix before a
    // shorter one, then a method match, then more header matches. Equal ones keep their
    // order: the more specific policy's first, then as written.
    rules.sort_by(|(a, _), (b, _)| b.cmp(a));
    rules.into_iter().map(|(_, rule)| rule).collect()
}

/// How a MeshHTTPRoute match ranks in Gateway API's precedence; greater goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct MatchRank {
    /// Exact (3), prefix (2), regex (1) or no path match (0); then the path's length.
    path: (u8, usize),
    /// A method match.
    method: bool,
    /// How many header matches.
    headers: usize,
}

/// A MeshHTTPRoute `PathPrefix` as Kuma (and Gateway API) mean it: whole path segments, so
/// `/api` matches `/api` and `/api/v1` but not `/apikeys`; a trailing `/` is ignored, and `/`
/// matches every path. Sent as an anchored regex (the proxy matches a regex against the whole
/// path); a legacy TrafficRoute's `prefix` stays a plain string prefix, as in Kuma.
fn path_prefix(value: &str) -> string_match::Kind {
    let trimmed = value.trim_end_matches('/');
    if trimmed.is_empty() {
        return string_match::Kind::Prefix("/".into());
    }
    string_match::Kind::Regex(format!("{}(?:/.*)?", regex::escape(trimmed)))
}

#[cfg(test)]
mod path_prefix_tests {
    use super::*;

    fn matches(prefix: &str, path: &str) -> bool {
        match path_prefix(prefix) {
            string_match::Kind::Prefix(p) => path.starts_with(&p),
            string_match::Kind::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .expect("a valid regex")
                .is_match(path),
            string_match::Kind::Exact(e) => path == e,
        }
    }

    #[test]
    fn a_path_prefix_matches_whole_segments() {
        for path in ["/api", "/api/", "/api/v1", "/api/v1/x"] {
            assert!(matches("/api", path), "{path}");
            assert!(matches("/api/", path), "{path} against /api/");
        }
        for path in ["/apikeys", "/api-internal", "/ap", "/"] {
            assert!(!matches("/api", path), "{path}");
        }
        assert!(matches("/", "/anything"));
        // Regex characters in the value are literal.
        assert!(matches("/a.b", "/a.b/c"));
        assert!(!matches("/a.b", "/axb"));
    }
}
