//! The REST API (Kuma's paths): read and write resources as universal JSON.
//!
//! `GET /`, `GET /meshes`, `GET|PUT|DELETE /meshes/{name}`, `GET /meshes/{mesh}/{plural}`,
//! `GET|PUT|DELETE /meshes/{mesh}/{plural}/{name}`. Errors are JSON with a 4xx status and a
//! message naming the problem. Mutating calls are accepted only from loopback unless the
//! caller presents the configured admin token.

use crate::discovery::Hub;
use crate::identity::IdentityService;
use crate::store::{PublishedInsight, ResourceKey, Store, StoreError, StoredResource};
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use weft_api::parse::parse_documents;
use weft_api::{Resource, ResourceType};

/// What the REST handlers share.
pub struct ApiState {
    /// The resource store.
    pub store: Arc<dyn Store>,
    /// When set, non-loopback callers may mutate by presenting `Authorization: Bearer <token>`.
    pub admin_token: Option<String>,
    /// Discovery: told about every write, and the source of insights and `_config`.
    pub hub: Arc<Hub>,
    /// Mesh identity, for dataplane tokens.
    pub identity: IdentityService,
}

/// An API error: status, a title, and what exactly is wrong.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    /// The HTTP status code.
    #[serde(rename = "status")]
    code: u16,
    /// A short summary.
    title: String,
    /// The full message.
    detail: String,
    /// The fields at fault, when the body was invalid.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    invalid_parameters: Vec<InvalidParameter>,
}

/// One invalid field of a request body.
#[derive(Debug, Serialize)]
pub struct InvalidParameter {
    /// Path of the field.
    field: String,
    /// Why it is invalid.
    reason: String,
    /// Line in the body, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
}

impl ApiError {
    fn new(status: StatusCode, title: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code: status.as_u16(),
            title: title.into(),
            detail: detail.into(),
            invalid_parameters: vec![],
        }
    }
    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", detail)
    }
    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not Found", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::MeshNotFound(_) => StatusCode::BAD_REQUEST,
            StoreError::Conflict { .. } | StoreError::MeshNotEmpty { .. } => StatusCode::CONFLICT,
            StoreError::Corrupt { .. } | StoreError::Backend(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let title = status.canonical_reason().unwrap_or("Error");
        ApiError::new(status, title, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Builds the REST router over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/meshes", get(list_meshes))
        .route(
            "/tokens/dataplane",
            axum::routing::post(generate_dataplane_token),
        )
        .route(
            "/tokens/dataplane/revocations",
            axum::routing::post(revoke_dataplane_token),
        )
        .route(
            "/meshes/{name}",
            get(get_mesh).put(put_mesh).delete(delete_mesh),
        )
        .route("/meshes/{mesh}/{plural}", get(list_in_mesh))
        .route(
            "/meshes/{mesh}/{plural}/{name}",
            get(get_in_mesh).put(put_in_mesh).delete(delete_in_mesh),
        )
        .route(
            "/meshes/{mesh}/{plural}/{name}/{view}",
            get(get_dataplane_view),
        )
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard_mutations,
        ))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// The longest error text of axum's own that [`json_errors`] reads: its rejections are a line.
const MAX_REJECTION_TEXT: usize = 16 * 1024;

/// Turns the errors axum answers by itself (a path that is not valid percent-encoding, a body
/// over the size limit, ...) from plain text into the JSON error every handler answers, so a
/// client reads one error shape whatever went wrong.
async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_media_type);
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // axum's rejections are a line of text; a body over the bound (none is) is named, not
    // read further.
    let text = match axum::body::to_bytes(body, MAX_REJECTION_TEXT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::from("(an error body too long to show)"),
    };
    let title = status.canonical_reason().unwrap_or("Error");
    let detail = if text.is_empty() {
        title.to_string()
    } else {
        text
    };
    let mut json = ApiError::new(status, title, detail).into_response();
    // The other headers (`Allow`, `Retry-After`, ...) still hold.
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            json.headers_mut().append(name, value.clone());
        }
    }
    json
}

/// Whether a `Content-Type` is JSON: `application/json` or a `+json` type such as
/// `application/problem+json`, in any case, with any parameters.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// Any path the API does not have: a JSON error like every other (it was an empty 404).
async fn no_such_endpoint(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "Not Found",
        format!("no such endpoint: {}", uri.path()),
    )
}

/// A method the path does not take: a JSON error like every other (it was an empty 405).
async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Whether the caller is trusted: on loopback, or presenting the admin token. Anyone may
/// read, but only a trusted caller may mutate, or read a provided CA's private key.
#[derive(Debug, Clone, Copy)]
struct Trusted(bool);

/// What a caller that is not trusted reads in place of a provided CA's private key.
pub const REDACTED: &str = "(redacted: read it from loopback or with the admin token)";

/// Refuses mutating calls from non-loopback peers unless they carry the admin token, and
/// tells the handlers whether the caller is trusted ([`Trusted`]).
async fn guard_mutations(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let trusted = peer.ip().to_canonical().is_loopback() || {
        let presented = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match (&state.admin_token, presented) {
            // An empty token never matches, whatever the configuration says.
            (Some(want), Some(got)) if !want.is_empty() && !got.is_empty() => {
                constant_time_eq(want.as_bytes(), got.as_bytes())
            }
            _ => false,
        }
    };
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if mutating && !trusted {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("mutating calls are accepted only from loopback (or with the admin token); refused {} from {}", req.method(), peer.ip()),
        )
        .into_response();
    }
    req.extensions_mut().insert(Trusted(trusted));
    next.run(req).await
}

/// Replaces the inline private keys of a Mesh's provided CAs (`mtls.backends[].conf.key`'s
/// `inline` and `inlineString`) with [`REDACTED`]. With one, anyone could sign certificates
/// of the mesh's identities.
fn redact_ca_keys(mesh: &mut Value) {
    let Some(backends) = mesh
        .pointer_mut("/mtls/backends")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for backend in backends {
        if let Some(key) = backend
            .pointer_mut("/conf/key")
            .and_then(Value::as_object_mut)
        {
            for field in ["inline", "inlineString"] {
                if let Some(v) = key.get_mut(field) {
                    *v = Value::String(REDACTED.into());
                }
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> ApiResult<T>
where
    ApiError: From<E>,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            e.to_string(),
        )),
    }
}

async fn index() -> Json<Value> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    Json(
        json!({"product": "weft", "tagline": "weft", "version": env!("CARGO_PKG_VERSION"), "hostname": hostname}),
    )
}

fn plural_type(plural: &str) -> ApiResult<ResourceType> {
    ResourceType::ALL
        .into_iter()
        .find(|t| t.plural() == plural && t.is_mesh_scoped())
        .ok_or_else(|| {
            let known: Vec<&str> = ResourceType::ALL
                .iter()
                .filter(|t| t.is_mesh_scoped())
                .map(|t| t.plural())
                .collect();
            ApiError::not_found(format!(
                "unknown resource collection {plural:?}, expected one of {}",
                known.join(", ")
            ))
        })
}

/// The `size` and `offset` query parameters of a listing, as Kuma's API takes them.
#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    size: Option<String>,
    offset: Option<String>,
}

/// Which part of a listing to answer: `size` items from `offset` (the items are in name
/// order). Without `size` every item from `offset` is answered: Kuma answers pages of 100 by
/// default, which a client that reads only the first page would take for everything.
#[derive(Debug, Clone, Copy)]
struct Page {
    size: Option<usize>,
    offset: usize,
}

impl PageQuery {
    fn page(&self) -> ApiResult<Page> {
        let number = |name: &str, value: &Option<String>, min: usize| -> ApiResult<Option<usize>> {
            match value.as_deref() {
                None | Some("") => Ok(None),
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n >= min => Ok(Some(n)),
                    _ => Err(ApiError::bad_request(format!(
                        "query parameter {name}: {v:?} is not a whole number of at least {min}"
                    ))),
                },
            }
        };
        Ok(Page {
            size: number("size", &self.size, 1)?,
            offset: number("offset", &self.offset, 0)?.unwrap_or(0),
        })
    }
}

/// One page of a listing.
struct Paged<T> {
    /// How many items the whole listing has.
    total: usize,
    /// The page's items.
    items: Vec<T>,
    /// The URL of the page after this one, `null` on the last (as in Kuma).
    next: Value,
}

impl Page {
    /// Cuts this page out of `items`, the whole listing in order, before anything is made of
    /// them; the request's `uri` and `headers` give the `next` URL.
    fn cut<T>(self, items: Vec<T>, uri: &axum::http::Uri, headers: &HeaderMap) -> Paged<T> {
        let total = items.len();
        let end = self
            .size
            .map_or(total, |size| self.offset.saturating_add(size).min(total));
        let next = match self.size {
            Some(size) if end < total => Value::String(next_url(uri, headers, end, size)),
            _ => Value::Null,
        };
        let items = items
            .into_iter()
            .skip(self.offset)
            .take(end.saturating_sub(self.offset))
            .collect();
        Paged { total, items, next }
    }
}

/// The URL of the page of `size` items from `offset` of the listing at `uri`: absolute, as
/// Kuma's, when the request names a valid authority (its `Host`, or an HTTP/2 `:authority`),
/// with `https` when a TLS proxy in front says so (`X-Forwarded-Proto`); else the path alone.
fn next_url(uri: &axum::http::Uri, headers: &HeaderMap, offset: usize, size: usize) -> String {
    let path_and_query = format!("{}?offset={offset}&size={size}", uri.path());
    let authority = headers
        .get(axum::http::header::HOST)
        .and_then(|h| axum::http::uri::Authority::try_from(h.as_bytes()).ok())
        .or_else(|| uri.authority().cloned());
    let https = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    match authority {
        Some(a) => format!(
            "{}://{a}{path_and_query}",
            if https { "https" } else { "http" }
        ),
        None => path_and_query,
    }
}

/// A page as a listing's JSON body.
fn page_json(page: Paged<Value>) -> Json<Value> {
    Json(json!({"total": page.total, "items": page.items, "next": page.next}))
}

fn list_body(
    items: Vec<StoredResource>,
    page: Page,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Json<Value> {
    let page = page.cut(items, uri, headers);
    let items = page
        .items
        .iter()
        .map(|s| s.resource.to_universal(Some(&s.meta)))
        .collect();
    page_json(Paged {
        total: page.total,
        items,
        next: page.next,
    })
}

async fn list_meshes(
    State(s): State<Arc<ApiState>>,
    Extension(Trusted(trusted)): Extension<Trusted>,
    Query(query): Query<PageQuery>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let page = query.page()?;
    let store = s.store.clone();
    let meshes = blocking(move || store.list(ResourceType::Mesh, None)).await?;
    let Json(mut body) = list_body(meshes, page, &uri, &headers);
    if !trusted && let Some(items) = body.get_mut("items").and_then(Value::as_array_mut) {
        items.iter_mut().for_each(redact_ca_keys);
    }
    Ok(Json(body))
}

async fn list_in_mesh(
    State(s): State<Arc<ApiState>>,
    Path((mesh, plural)): Path<(String, String)>,
    Query(query): Query<PageQuery>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let page = query.page()?;
    if plural == "dataplanes+insights" {
        return dataplanes_insights(&s, mesh, page, &uri, &headers).await;
    }
    let ty = plural_type(&plural)?;
    let store = s.store.clone();
    let items = blocking(move || {
        let mesh_key = ResourceKey::mesh(mesh.clone());
        if store.get(&mesh_key)?.is_none() {
            return Err(StoreError::NotFound(mesh_key));
        }
        store.list(ty, Some(&mesh))
    })
    .await?;
    Ok(list_body(items, page, &uri, &headers))
}

async fn get_one(s: &ApiState, key: ResourceKey) -> ApiResult<Json<Value>> {
    let store = s.store.clone();
    let k = key.clone();
    match blocking(move || store.get(&k)).await? {
        Some(r) => Ok(Json(r.resource.to_universal(Some(&r.meta)))),
        None => Err(StoreError::NotFound(key).into()),
    }
}

async fn get_mesh(
    State(s): State<Arc<ApiState>>,
    Extension(Trusted(trusted)): Extension<Trusted>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let Json(mut mesh) = get_one(&s, ResourceKey::mesh(name)).await?;
    if !trusted {
        redact_ca_keys(&mut mesh);
    }
    Ok(Json(mesh))
}

async fn get_in_mesh(
    State(s): State<Arc<ApiState>>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    get_one(
        &s,
        ResourceKey {
            ty: plural_type(&plural)?,
            mesh,
            name,
        },
    )
    .await
}

/// Parses a PUT body and checks it against the path.
fn parse_body(
    body: &str,
    key: &ResourceKey,
    headers: &HeaderMap,
) -> ApiResult<(Resource, Option<u64>)> {
    let mut docs = parse_documents(body).map_err(|e| {
        let mut err = ApiError::bad_request(format!("invalid {}: {e}", key.ty));
        err.title = "Could not process a resource".into();
        if let Some(field) = &e.field {
            err.invalid_parameters.push(InvalidParameter {
                field: field.clone(),
                reason: e.message.clone(),
                line: e.line,
            });
        }
        err
    })?;
    if docs.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "expected exactly one resource in the body, found {}",
            docs.len()
        )));
    }
    let doc = docs.remove(0);
    let r = &doc.resource;
    if r.resource_type() != key.ty {
        return Err(ApiError::bad_request(format!(
            "the body is a {} but the path is for a {}",
            r.resource_type(),
            key.ty
        )));
    }
    if r.name != key.name {
        return Err(ApiError::bad_request(format!(
            "name {:?} in the body does not match {:?} in the path",
            r.name, key.name
        )));
    }
    if r.mesh_name() != key.mesh {
        return Err(ApiError::bad_request(format!(
            "mesh {:?} in the body does not match {:?} in the path",
            r.mesh_name(),
            key.mesh
        )));
    }
    let if_match = match headers
        .get("if-match")
        .map(|v| v.to_str().map(|s| s.trim_matches('"').parse::<u64>()))
    {
        None => None,
        Some(Ok(Ok(v))) => Some(v),
        Some(_) => {
            return Err(ApiError::bad_request(
                "If-Match must be a resource version (a non-negative integer)",
            ));
        }
    };
    Ok((doc.resource, if_match.or(doc.version)))
}

async fn put_one(
    s: &ApiState,
    key: ResourceKey,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    let (resource, version) = parse_body(&body, &key, &headers)?;
    let store = s.store.clone();
    let (stored, created) = blocking(move || {
        if let weft_api::Spec::Mesh(mesh) = &resource.spec {
            // Reads the CA's files, if any: off the async threads like the write itself.
            crate::identity::adapter::check_provided_cas(mesh).map_err(ApiError::bad_request)?;
        }
        store.put(&resource, version).map_err(ApiError::from)
    })
    .await?;
    s.hub.notify_change();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(stored.resource.to_universal(Some(&stored.meta))),
    )
        .into_response())
}

async fn put_mesh(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    put_one(&s, ResourceKey::mesh(name), headers, body).await
}

async fn put_in_mesh(
    State(s): State<Arc<ApiState>>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    put_one(
        &s,
        ResourceKey {
            ty: plural_type(&plural)?,
            mesh,
            name,
        },
        headers,
        body,
    )
    .await
}

/// Query parameters of DELETE.
#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    /// Delete a mesh together with everything in it.
    #[serde(default)]
    cascade: bool,
}

async fn delete_one(s: &ApiState, key: ResourceKey, cascade: bool) -> ApiResult<Json<Value>> {
    let store = s.store.clone();
    let deleted = blocking(move || store.delete(&key, cascade)).await?;
    s.hub.notify_change();
    let names: Vec<Value> = deleted
        .iter()
        .map(|k| json!({"type": k.ty.name(), "mesh": k.mesh, "name": k.name}))
        .collect();
    Ok(Json(json!({"deleted": names})))
}

async fn delete_mesh(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<DeleteParams>,
) -> ApiResult<Json<Value>> {
    delete_one(&s, ResourceKey::mesh(name), q.cascade).await
}

async fn delete_in_mesh(
    State(s): State<Arc<ApiState>>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    delete_one(
        &s,
        ResourceKey {
            ty: plural_type(&plural)?,
            mesh,
            name,
        },
        false,
    )
    .await
}

/// `GET /meshes/{mesh}/dataplanes+insights`: each dataplane with its proxy's status.
async fn dataplanes_insights(
    s: &ApiState,
    mesh: String,
    page: Page,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> ApiResult<Json<Value>> {
    let store = s.store.clone();
    let m = mesh.clone();
    let (items, published) = blocking(move || {
        let mesh_key = ResourceKey::mesh(m.clone());
        if store.get(&mesh_key)?.is_none() {
            return Err(StoreError::NotFound(mesh_key));
        }
        let items = store.list(ResourceType::Dataplane, Some(&m))?;
        // What the other replicas know of their proxies (with one replica, its own).
        let published = store.insights(&m, crate::discovery::hub::now_ms())?;
        Ok((items, published))
    })
    .await?;
    let published: HashMap<&str, &PublishedInsight> =
        published.iter().map(|p| (p.name.as_str(), p)).collect();
    let page = page.cut(items, uri, headers);
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|d| {
            let name = d.resource.name.as_str();
            let insight = s
                .hub
                .insight(&mesh, name, published.get(name).copied())
                .unwrap_or_else(|| json!({"online": false}));
            json!({
                "type": "DataplaneOverview",
                "mesh": mesh,
                "name": d.resource.name,
                "dataplane": d.resource.to_universal(Some(&d.meta)),
                "dataplaneInsight": insight,
            })
        })
        .collect();
    Ok(page_json(Paged {
        total: page.total,
        items,
        next: page.next,
    }))
}

/// The header that says where a `_config` answer came from, when it is not this replica's own
/// record of what it sent.
pub const CONFIG_SOURCE_HEADER: &str = "weft-config-source";

/// `GET /meshes/{mesh}/dataplanes/{name}/_config`: the snapshot last sent to that proxy.
///
/// A proxy connected to another replica (on a shared store) gets the snapshot built here from
/// this replica's view of the store, which is what that replica sends: a snapshot is a
/// function of the stored resources (its `version` hashes its content), so replicas that have
/// read the same store revision build the same one. It has no nonce (that is per push), and
/// the `weft-config-source` header names the replica the proxy is at. Kuma's control plane
/// likewise builds `_config` on whichever instance is asked.
async fn get_dataplane_view(
    State(s): State<Arc<ApiState>>,
    Path((mesh, plural, name, view)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    if plural != "dataplanes" || view != "_config" {
        return Err(ApiError::not_found(format!(
            "no such view {plural}/{name}/{view}; try dataplanes/{name}/_config"
        )));
    }
    let sent = s.hub.status(&mesh, &name).and_then(|st| st.last_sent);
    if let Some(sent) = sent {
        return Ok(
            Json(serde_json::to_value(sent.snapshot()).unwrap_or(Value::Null)).into_response(),
        );
    }
    let store = s.store.clone();
    let m = mesh.clone();
    let published = blocking(move || store.insights(&m, crate::discovery::hub::now_ms())).await?;
    let Some(elsewhere) = published
        .into_iter()
        .find(|p| p.name == name && p.replica != s.hub.replica())
    else {
        return Err(ApiError::not_found(format!(
            "no configuration was sent to dataplane {name:?} of mesh {mesh:?}: its proxy never connected"
        )));
    };
    let status = if elsewhere.online {
        "connected to"
    } else {
        "last connected to"
    };
    let views = s.hub.subscribe().borrow().clone();
    let Some((view, dataplane)) = views
        .meshes
        .get(&mesh)
        .and_then(|view| Some((view, view.dataplanes.get(&name)?)))
    else {
        // Registered at the other replica but not (yet) in this replica's view of the store.
        return Err(ApiError::not_found(format!(
            "dataplane {name:?} of mesh {mesh:?} is {status} control-plane replica {}, and this \
             replica has not read it from the store yet: its _config is served there",
            elsewhere.replica
        )));
    };
    let snapshot = crate::discovery::snapshot::build_message(&mesh, &name, dataplane, view);
    let source = format!(
        "built by replica {} from the store; the proxy is {status} replica {}",
        s.hub.replica(),
        elsewhere.replica
    );
    let mut response = Json(serde_json::to_value(snapshot).unwrap_or(Value::Null)).into_response();
    if let Ok(value) = axum::http::HeaderValue::from_str(&source) {
        response.headers_mut().insert(CONFIG_SOURCE_HEADER, value);
    }
    Ok(response)
}

/// Body of `POST /tokens/dataplane` (Kuma's shape).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenRequest {
    /// The dataplane's name.
    name: String,
    /// The dataplane's mesh.
    mesh: String,
    /// Validity, e.g. `24h` (default 10 years, as Kuma's).
    #[serde(default)]
    valid_for: Option<String>,
    /// Kuma's tag scope; kumactl sends `null`. Only an empty scope is taken: a weft token is
    /// bound to the dataplane's name.
    #[serde(default)]
    tags: Option<std::collections::BTreeMap<String, Value>>,
    /// Kuma's proxy type; kumactl sends `""`. Only a dataplane's (`""` or `dataplane`).
    #[serde(default, rename = "type")]
    proxy_type: Option<String>,
}

/// `POST /tokens/dataplane`: a signed token for one dataplane of one mesh, as plain text.
async fn generate_dataplane_token(
    State(s): State<Arc<ApiState>>,
    body: String,
) -> ApiResult<Response> {
    let req: TokenRequest = serde_json::from_str(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid token request: {e}")))?;
    if req.tags.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request(
            "tags: tag-scoped tokens are not supported; a token is bound to the dataplane's \
             name (leave tags out or null)",
        ));
    }
    if let Some(t) = req
        .proxy_type
        .as_deref()
        .filter(|t| !t.is_empty() && *t != "dataplane")
    {
        return Err(ApiError::bad_request(format!(
            "type: {t:?} tokens are not supported; only dataplane tokens (leave type out, empty \
             or \"dataplane\")"
        )));
    }
    weft_api::validate::validate_name(&req.name, 253, false)
        .map_err(|m| ApiError::bad_request(format!("name: {m}")))?;
    let valid_for = match req.valid_for.as_deref() {
        None => std::time::Duration::from_secs(10 * 365 * 86_400),
        Some(v) => weft_api::duration::parse_duration(v)
            .map_err(|e| ApiError::bad_request(format!("validFor: {e}")))?,
    };
    let mesh_created = |store: Arc<dyn Store>, mesh: String| async move {
        let key = ResourceKey::mesh(mesh);
        blocking(move || store.get(&key))
            .await
            .map(|m| m.map(|m| m.meta.creation_time))
    };
    let Some(created) = mesh_created(s.store.clone(), req.mesh.clone()).await? else {
        return Err(ApiError::bad_request(format!(
            "mesh {:?} does not exist",
            req.mesh
        )));
    };
    let mesh = req.mesh.clone();
    let identity = s.identity.clone();
    let issued = tokio::task::spawn_blocking(move || {
        identity.tokens().issue(&req.mesh, &req.name, valid_for)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            e.to_string(),
        )
    })?
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // A cascade delete of the mesh meanwhile removed its signing key, and the issue may have
    // made a new one, which a mesh created later under the same name would inherit: the
    // token must not outlive the mesh it was asked for. So it is handed out only if that
    // mesh is still there.
    if mesh_created(s.store.clone(), mesh.clone()).await?.as_ref() != Some(&created) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!("mesh {mesh:?} was deleted while the token was issued"),
        ));
    }
    // The token id lets the user revoke it later (`weftctl revoke dataplane-token`).
    let id = issued.claims.jti.clone();
    Ok((
        StatusCode::OK,
        [
            ("content-type", "text/plain"),
            ("x-weft-token-id", id.as_str()),
        ],
        issued.token,
    )
        .into_response())
}

/// Body of `POST /tokens/dataplane/revocations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The token's mesh.
    mesh: String,
    /// The token's id (its `jti` claim).
    id: String,
}

/// `POST /tokens/dataplane/revocations`: revokes a token by id; it fails at its next use.
async fn revoke_dataplane_token(
    State(s): State<Arc<ApiState>>,
    body: String,
) -> ApiResult<Json<Value>> {
    let req: RevokeRequest = serde_json::from_str(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid revocation request: {e}")))?;
    // A revocation filed under a mesh that does not exist revokes nothing: the token is
    // checked against its own mesh's revocations.
    let store = s.store.clone();
    let key = ResourceKey::mesh(req.mesh.clone());
    if blocking(move || store.get(&key)).await?.is_none() {
        return Err(ApiError::bad_request(format!(
            "mesh {:?} does not exist: a token is revoked in the mesh it was issued for",
            req.mesh
        )));
    }
    let identity = s.identity.clone();
    let (mesh, id) = (req.mesh.clone(), req.id.clone());
    tokio::task::spawn_blocking(move || identity.tokens().revoke(&mesh, &id))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
                e.to_string(),
            )
        })?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({"revoked": req.id, "mesh": req.mesh})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_names_the_authority_only_when_it_is_one() {
        let uri: axum::http::Uri = "/meshes/default/dataplanes?size=2".parse().expect("uri");
        let with = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().expect("header value"));
            }
            next_url(&uri, &h, 4, 2)
        };
        assert_eq!(
            with(&[("host", "cp:5681")]),
            "http://cp:5681/meshes/default/dataplanes?offset=4&size=2"
        );
        assert_eq!(
            with(&[("host", "cp.example"), ("x-forwarded-proto", "HTTPS")]),
            "https://cp.example/meshes/default/dataplanes?offset=4&size=2"
        );
        assert_eq!(
            with(&[("host", "evil/x?")]),
            "/meshes/default/dataplanes?offset=4&size=2",
            "a Host that is no authority is left out"
        );
        assert_eq!(with(&[]), "/meshes/default/dataplanes?offset=4&size=2");
    }

    #[test]
    fn json_media_types_are_recognised() {
        for t in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
        ] {
            assert!(is_json_media_type(t), "{t}");
        }
        for t in ["text/plain; charset=utf-8", "application/jsonl", ""] {
            assert!(!is_json_media_type(t), "{t}");
        }
    }
}
