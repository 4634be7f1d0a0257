//! A blocking client of the REST API, used by `weftctl` and by tests.

use serde_json::Value;
use std::time::Duration;
use weft_api::{Resource, ResourceType};

/// Why a call failed. The distinction sets `weftctl`'s exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane could not be reached (exit 2).
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable {
        /// The API URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The API URL is not one (exit 1: the input is wrong, nothing was tried).
    #[error("--api-url {url:?} is not a usable URL: {reason}")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The control plane refused the request (exit 1).
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
}

/// A REST API client.
pub struct Client {
    base: String,
    http: reqwest::blocking::Client,
    token: Option<String>,
}

impl Client {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:5681`).
    pub fn new(base: &str, admin_token: Option<String>) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadUrl {
            url: base.into(),
            reason,
        };
        let url = reqwest::Url::parse(base).map_err(|e| bad(e.to_string()))?;
        if url.scheme() != "http" {
            return Err(bad(format!(
                "the scheme must be http (as in http://127.0.0.1:5681), not {:?}; for a \
                 control plane behind TLS, reach it through a TLS proxy or tunnel",
                url.scheme()
            )));
        }
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: base.into(),
                reason: e.to_string(),
            })?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            http,
            token: admin_token,
        })
    }

    /// Sends with the admin token, if any; a 4xx/5xx becomes [`ClientError::Refused`] with the
    /// server's `detail` message. Returns the status and the body text.
    fn send_raw(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<(u16, String), ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let resp = req.send().map_err(|e| unreachable(root_cause(&e)))?;
        let status = resp.status().as_u16();
        let text = resp.text().map_err(|e| unreachable(e.to_string()))?;
        if status >= 400 {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Refused { status, message });
        }
        Ok((status, text))
    }

    /// [`Self::send_raw`], with the body read as JSON (or as a JSON string if it is not JSON).
    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<(u16, Value), ClientError> {
        let (status, text) = self.send_raw(req)?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// The path of a resource (names percent-encoded, so that a name with `/` or `?` in it
    /// cannot reach another path or add a query: the API refuses it as a name instead).
    pub fn path(ty: ResourceType, mesh: &str, name: &str) -> String {
        let (mesh, name) = (segment(mesh), segment(name));
        if ty == ResourceType::Mesh {
            format!("/meshes/{name}")
        } else {
            format!("/meshes/{mesh}/{}/{name}", ty.plural())
        }
    }

    /// GETs a path and returns the JSON body.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .map(|(_, v)| v)
    }

    /// PUTs a resource; returns the stored form and whether it was created.
    pub fn put(
        &self,
        resource: &Resource,
        version: Option<u64>,
    ) -> Result<(Value, bool), ClientError> {
        let mut body = resource.to_universal(None);
        if let (Some(v), Some(obj)) = (version, body.as_object_mut()) {
            obj.insert("version".into(), Value::from(v));
        }
        let path = Self::path(
            resource.resource_type(),
            resource.mesh_name(),
            &resource.name,
        );
        let req = self
            .http
            .put(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req).map(|(status, v)| (v, status == 201))
    }

    /// POSTs JSON and returns the JSON answer.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req).map(|(_, v)| v)
    }

    /// POSTs JSON and returns the plain-text answer (e.g. a token).
    pub fn post_text(&self, path: &str, body: &Value) -> Result<String, ClientError> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send_raw(req).map(|(_, text)| text.trim().to_string())
    }

    /// DELETEs a resource (a mesh with `cascade` takes its contents along).
    pub fn delete(
        &self,
        ty: ResourceType,
        mesh: &str,
        name: &str,
        cascade: bool,
    ) -> Result<Value, ClientError> {
        let mut url = format!("{}{}", self.base, Self::path(ty, mesh, name));
        if cascade {
            url.push_str("?cascade=true");
        }
        self.send(self.http.delete(url)).map(|(_, v)| v)
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The bytes a path segment keeps as they are (RFC 3986 unreserved); the rest are escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` as one URL path segment.
pub fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SEGMENT).to_string()
}
