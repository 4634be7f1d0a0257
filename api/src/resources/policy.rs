//! Policies: who may call whom (TrafficPermission, MeshTrafficPermission) and where requests
//! go (TrafficRoute, MeshHTTPRoute). Legacy policies select proxies by tags
//! (`sources`/`destinations`); targetRef policies put everything under `spec`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Tags a selector matches; the value `*` matches any value.
pub type Tags = BTreeMap<String, String>;

/// A legacy tag selector: `{match: {kuma.io/service: web}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Tags that must all match.
    #[serde(rename = "match")]
    pub tags: Tags,
}

impl Selector {
    /// Whether these tags satisfy the selector (`*` matches any present value).
    pub fn matches(&self, tags: &Tags) -> bool {
        self.tags.iter().all(|(k, v)| {
            (v == "*" && (k == "kuma.io/service" || tags.contains_key(k))) || tags.get(k) == Some(v)
        })
    }
}

/// The body of a `TrafficPermission` (legacy): allow `sources` to call `destinations`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPermissionSpec {
    /// Calling proxies.
    pub sources: Vec<Selector>,
    /// Called proxies.
    pub destinations: Vec<Selector>,
}

/// The body of a `TrafficRoute` (legacy).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficRouteSpec {
    /// Calling proxies this route applies to.
    pub sources: Vec<Selector>,
    /// Destination services this route applies to.
    pub destinations: Vec<Selector>,
    /// Where traffic goes.
    pub conf: TrafficRouteConf,
}

/// `conf` of a TrafficRoute: `split` or `destination`, optional `http` rules, `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficRouteConf {
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<Split>,
    /// A single destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Tags>,
    /// HTTP rules, tried in order before the default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    /// Load-balancing algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// One weighted destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Split {
    /// Relative weight (0 takes no traffic).
    pub weight: u32,
    /// Tags selecting the endpoints.
    pub destination: Tags,
}

/// One `http[]` rule of a TrafficRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    /// What requests the rule takes.
    #[serde(rename = "match")]
    pub matcher: HttpMatch,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<Split>,
    /// A single destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Tags>,
}

/// `http[].match` of a TrafficRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatch {
    /// Request method: `POST`, or as Kuma writes it, `{exact: POST}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodMatch>,
    /// Request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// Request headers, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
}

/// The method of a TrafficRoute `http[].match`: Kuma writes it as a [`StringMatch`];
/// a plain method name is accepted too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MethodMatch {
    /// `method: POST`.
    Name(String),
    /// `method: {exact: POST}`. Only `exact` is supported: validation rejects `prefix` and
    /// `regex`, which match no more than a list of methods would.
    Match(StringMatch),
}

impl MethodMatch {
    /// The method to match exactly, or `None` for a `prefix` or `regex` match.
    pub fn exact(&self) -> Option<&str> {
        match self {
            MethodMatch::Name(m) => Some(m),
            MethodMatch::Match(m) => m.exact.as_deref(),
        }
    }
}

/// Exactly one of `prefix`, `exact` or `regex`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatch {
    /// Matches values starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Matches this value only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Matches values the whole of which match this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// `loadBalancer`: exactly one algorithm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    /// Round robin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_robin: Option<Empty>,
    /// Power of `choiceCount` choices over outstanding load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_request: Option<LeastRequest>,
    /// Uniformly random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<Empty>,
}

/// An empty object, `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `leastRequest` settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeastRequest {
    /// How many endpoints to sample per pick (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_count: Option<u32>,
}

/// A targetRef: what a targetRef policy applies to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    /// `Mesh`, `MeshSubset`, `MeshService`, `MeshServiceSubset`, `Dataplane` or `MeshHTTPRoute`.
    pub kind: TargetKind,
    /// Name of the referenced service, dataplane or route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tags narrowing a subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: Tags,
}

/// Kinds a targetRef may name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetKind {
    /// Every proxy of the mesh.
    #[default]
    Mesh,
    /// Proxies whose tags match.
    MeshSubset,
    /// Proxies of one service.
    MeshService,
    /// Proxies of one service whose tags match.
    MeshServiceSubset,
    /// One proxy by name.
    Dataplane,
    /// A route.
    #[serde(rename = "MeshHTTPRoute")]
    MeshHttpRoute,
}

/// The body of a `MeshTrafficPermission`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshTrafficPermissionSpec {
    /// The proxies whose inbound traffic this governs.
    pub target_ref: TargetRef,
    /// Callers and what happens to them.
    #[serde(default)]
    pub from: Vec<PermissionFrom>,
}

/// `from[]` of a MeshTrafficPermission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PermissionFrom {
    /// The callers.
    pub target_ref: TargetRef,
    /// The action.
    pub default: PermissionConf,
}

/// `from[].default` of a MeshTrafficPermission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PermissionConf {
    /// Allow, Deny or AllowWithShadowDeny.
    pub action: Action,
}

/// What a permission does to matching callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Let through.
    #[default]
    Allow,
    /// Refuse.
    Deny,
    /// Let through, but log as if denied.
    AllowWithShadowDeny,
}

/// The body of a `MeshHTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshHttpRouteSpec {
    /// The calling proxies.
    pub target_ref: TargetRef,
    /// Per destination service, its rules.
    pub to: Vec<HttpRouteTo>,
}

/// `to[]` of a MeshHTTPRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTo {
    /// The destination service.
    pub target_ref: TargetRef,
    /// Rules, first match wins.
    pub rules: Vec<HttpRouteRule>,
}

/// One rule of a MeshHTTPRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Any one of these matches selects the rule.
    pub matches: Vec<HttpRouteMatch>,
    /// What happens to selected requests.
    pub default: HttpRouteAction,
}

/// One match of a MeshHTTPRoute rule; all its parts must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A path match of a MeshHTTPRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    /// How `value` is compared.
    #[serde(rename = "type")]
    pub kind: PathMatchType,
    /// The path, prefix or regular expression.
    pub value: String,
}

/// Path match types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path.
    Exact,
    /// Path prefix, on segment boundaries.
    #[default]
    PathPrefix,
    /// A regular expression over the whole path.
    RegularExpression,
}

/// A header match of a MeshHTTPRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    /// How `value` is compared (default Exact).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<HeaderMatchType>,
    /// Header name.
    pub name: String,
    /// Value to compare (not used by Present/Absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Header match types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderMatchType {
    /// Equal.
    Exact,
    /// Starts with.
    Prefix,
    /// Regular expression over the whole value.
    RegularExpression,
    /// The header is present.
    Present,
    /// The header is absent.
    Absent,
}

/// `default` of a MeshHTTPRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteAction {
    /// Header modifications.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpFilter>,
    /// Weighted backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

/// A filter of a MeshHTTPRoute rule: request or response header modifier.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpFilter {
    /// The filter type.
    #[serde(rename = "type")]
    pub kind: HttpFilterType,
    /// For RequestHeaderModifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For ResponseHeaderModifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
}

/// Filter types weft supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpFilterType {
    /// Change request headers.
    #[default]
    RequestHeaderModifier,
    /// Change response headers.
    ResponseHeaderModifier,
}

/// Header changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Headers set (replacing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Headers added (appending).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    /// Header names removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A weighted backend of a MeshHTTPRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// `MeshService` or `MeshServiceSubset`.
    pub kind: TargetKind,
    /// The service.
    pub name: String,
    /// Subset tags (MeshServiceSubset).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: Tags,
    /// Relative weight (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}
