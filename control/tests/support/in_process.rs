//! The control plane started in the test's own process (store, hub and servers at hand), for
//! tests that drive discovery with fake proxies.

use weft_control::run::{ControlPlane, RunConfig, start};

/// Starts a control plane on loopback with its data under `dir`.
pub async fn control_plane(dir: &std::path::Path) -> ControlPlane {
    control_plane_on(dir, None).await
}

/// Starts a control plane on loopback with its data under `dir` and its store at `store_url`
/// (`None`: the embedded store under `dir`).
pub async fn control_plane_on(dir: &std::path::Path, store_url: Option<String>) -> ControlPlane {
    control_plane_with(dir, store_url, weft_control::run::DEFAULT_DP_KEEPALIVE).await
}

/// [`control_plane_on`] with the dataplane server's keepalive (`RunConfig::dp_keepalive`).
pub async fn control_plane_with(
    dir: &std::path::Path,
    store_url: Option<String>,
    dp_keepalive: std::time::Duration,
) -> ControlPlane {
    start(RunConfig {
        data_dir: dir.to_path_buf(),
        store_url,
        api_address: "127.0.0.1:0".parse().expect("addr"),
        dp_server_address: "127.0.0.1:0".parse().expect("addr"),
        dp_server_sans: vec![],
        dp_server_cert: None,
        no_default_mesh: false,
        admin_token: None,
        dp_keepalive,
    })
    .await
    .expect("control plane starts")
}

/// Stores every resource of `yaml` and tells the hub, as an apply would, from a blocking
/// thread (the PostgreSQL store's client must not run on the async runtime).
pub async fn put_off_runtime(cp: &ControlPlane, yaml: &str) {
    let store = cp.store.clone();
    let yaml = yaml.to_string();
    tokio::task::spawn_blocking(move || {
        for doc in weft_api::parse::parse_documents(&yaml).expect("valid yaml") {
            store.put(&doc.resource, None).expect("stored");
        }
    })
    .await
    .expect("put");
    cp.hub.notify_change();
}

/// Stores every resource of `yaml` and tells the hub, as an apply would.
pub fn put(cp: &ControlPlane, yaml: &str) {
    for doc in weft_api::parse::parse_documents(yaml).expect("valid yaml") {
        cp.store.put(&doc.resource, None).expect("stored");
    }
    cp.hub.notify_change();
}
