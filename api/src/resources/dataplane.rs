//! The `Dataplane` resource: one proxy, its address, the services it exposes (inbounds) and,
//! in explicit mode, the services it calls (outbounds). Kuma's `dataplane.proto`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The tag every inbound must carry: the name of the service it belongs to.
pub const SERVICE_TAG: &str = "kuma.io/service";

/// Whether `name` can name a service: it is a segment of its proxies' SPIFFE identity
/// (`spiffe://<mesh>/<service>`), so it is letters, digits and `-._~`, and not `.` or `..`.
///
/// ```
/// use weft_api::dataplane::is_service_name;
/// assert!(is_service_name("backend_v2.svc"));
/// assert!(!is_service_name("api/v1"));
/// ```
pub fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}
/// The optional tag that names an inbound's protocol.
pub const PROTOCOL_TAG: &str = "kuma.io/protocol";

/// The body of a `Dataplane`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataplaneSpec {
    /// Addresses and ports.
    pub networking: DataplaneNetworking,
}

/// `networking` of a dataplane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataplaneNetworking {
    /// The address other proxies reach this one on.
    pub address: String,
    /// Services this proxy fronts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<Inbound>,
    /// Explicit-mode outbounds: local ports the app calls to reach a mesh service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<Outbound>,
    /// Transparent-proxy redirect ports; present means iptables interception.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent_proxying: Option<TransparentProxying>,
}

/// One inbound: a port of this proxy in front of an app port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Inbound {
    /// The port other proxies connect to.
    pub port: u32,
    /// The app's port (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u32>,
    /// The app's address (default `127.0.0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_address: Option<String>,
    /// The address this inbound is reached on (default: `networking.address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Tags; `kuma.io/service` is required.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl Inbound {
    /// The `kuma.io/service` tag (validation guarantees it on stored resources).
    pub fn service(&self) -> &str {
        self.tags.get(SERVICE_TAG).map(String::as_str).unwrap_or("")
    }

    /// The app port: `servicePort`, or `port` when unset.
    pub fn app_port(&self) -> u32 {
        self.service_port.unwrap_or(self.port)
    }

    /// The app address: `serviceAddress`, or `127.0.0.1` when unset.
    pub fn app_address(&self) -> &str {
        self.service_address.as_deref().unwrap_or("127.0.0.1")
    }
}

/// One explicit-mode outbound.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Outbound {
    /// The local port the app calls.
    pub port: u32,
    /// The local address the proxy listens on (default `127.0.0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `kuma.io/service` names the destination service.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// `transparentProxying` of a dataplane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TransparentProxying {
    /// Port inbound traffic is redirected to (default 15006).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_port_inbound: Option<u32>,
    /// Port outbound traffic is redirected to (default 15001).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_port_outbound: Option<u32>,
}
