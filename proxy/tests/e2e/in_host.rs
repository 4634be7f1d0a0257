//! Tokio apps and clients inside a host: a runtime for in-process server apps, listeners
//! bound inside a host's namespace, and client code run to completion on a thread inside one.
//! The L7 tests' apps are tokio/hyper/tonic servers of the test process; their sockets belong
//! to the namespaces they were bound in, whichever thread serves them.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Runtime;
use weft_tests::Host;

/// The runtime the server apps run on. Their sockets belong to the namespaces they were bound
/// in, whichever thread serves them. Dropping it stops the apps.
pub fn apps_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the apps")
}

/// A listener on `0.0.0.0:port` inside `host`, for a tokio app.
pub fn listen_in(host: &Host, port: u16) -> std::net::TcpListener {
    let l = host
        .enter(move || std::net::TcpListener::bind(("0.0.0.0", port)))
        .expect("enter")
        .expect("bind the app");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// Runs `f` to completion on a runtime of its own on a thread inside `host`'s namespace (so
/// every socket it opens is the host's, and its connections go through the host's sidecar),
/// bounded by `timeout`. A panic in `f` is passed on.
pub fn run_in<F, Fut, R>(host: &Host, timeout: Duration, f: F) -> R
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = R>,
    R: Send,
{
    host.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the client");
        rt.block_on(async {
            tokio::time::timeout(timeout, f())
                .await
                .unwrap_or_else(|_| panic!("the client did not finish within {timeout:?}"))
        })
    })
    .expect("enter")
}
