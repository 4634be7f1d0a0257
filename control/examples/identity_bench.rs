//! Identity benchmark (not a test): how many `Identity.Certify` calls one
//! control-plane core serves, and how long a proxy takes from start to its
//! first certificate.
//!
//! ```text
//! cargo run --release -p weft-control --example identity_bench -- [SECONDS] [CONCURRENCY]
//! ```
//!
//! The control plane's gRPC server (TLS) runs on a single-threaded tokio
//! runtime on its own OS thread, so it uses at most one core; the load comes
//! from another thread over 4 HTTP/2 connections with pre-built CSRs (so the
//! client's key generation does not compete). Also reported: the same work
//! without gRPC (`IdentityService::certify` in a loop on one thread).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_api::proto::CertifyRequest;
use weft_api::proto::identity_client::IdentityClient;
use weft_control::identity::cp_tls::CpTls;
use weft_control::identity::{
    BackendKind, IdentityService, MemoryStore, MeshMtls, MtlsBackend, MtlsMode,
};
use weft_proxy::identity::{Identity, IdentityConfig, TokenSource};
use weft_proxy::metrics::Metrics;

fn main() -> anyhow::Result<()> {
    weft_proxy::tls::install_default_crypto_provider();
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let concurrency: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);

    let store = Arc::new(MemoryStore::new());
    store.set_mesh(
        "bench",
        MeshMtls {
            enabled_backend: Some("ca-1".into()),
            backends: vec![MtlsBackend {
                name: "ca-1".into(),
                kind: BackendKind::Builtin {
                    ca_expiration: None,
                },
                dp_cert_lifetime: None,
            }],
            mode: MtlsMode::Strict,
        },
    );
    store.set_dataplane("bench", "dp-1", vec!["web".into(), "web-admin".into()]);
    let svc = IdentityService::new(store.clone(), store);
    let token = svc
        .tokens()
        .issue("bench", "dp-1", Duration::from_secs(3600))?
        .token;
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..256)
            .map(|_| {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                Ok(rcgen::CertificateParams::default()
                    .serialize_request(&key)?
                    .der()
                    .to_vec())
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let req = |i: usize| CertifyRequest {
        csr: csrs[i % csrs.len()].clone(),
        mesh: "bench".into(),
        dataplane: "dp-1".into(),
    };

    // 1. In process, one thread: the cost of the checks and the signature.
    svc.certify(Some(&token), &req(0))?; // creates the CA
    let n = 5000;
    let t = Instant::now();
    for i in 0..n {
        svc.certify(Some(&token), &req(i))?;
    }
    let per = t.elapsed() / n as u32;
    println!(
        "in-process certify (1 thread): {:.0}/s, {:.1} µs each",
        1.0 / per.as_secs_f64(),
        per.as_secs_f64() * 1e6
    );

    // 2. Over gRPC + TLS, server on one core.
    let dir = tempfile::tempdir()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let tls = CpTls::load_or_create(dir.path(), &[addr], &[])?;
    let ca_pem = tls.ca_pem.clone().into_bytes();
    let server_svc = svc.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let _ = tonic::transport::Server::builder()
                .tls_config(tls.server_tls_config())
                .expect("tls")
                .add_service(server_svc.into_server())
                .serve_with_incoming(incoming)
                .await;
        });
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = format!("https://127.0.0.1:{}", addr.port());
        let mut channels = Vec::new();
        for _ in 0..4 {
            let ch = tonic::transport::Endpoint::from_shared(url.clone())?
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem)),
                )?
                .connect()
                .await?;
            channels.push(ch);
        }
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let mut client = IdentityClient::new(channels[w % channels.len()].clone());
            let token = token.clone();
            let csrs = csrs.clone();
            let (done, errors) = (done.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while Instant::now() < deadline {
                    let mut r = tonic::Request::new(CertifyRequest {
                        csr: csrs[i % csrs.len()].clone(),
                        mesh: "bench".into(),
                        dataplane: "dp-1".into(),
                    });
                    if let Ok(v) = format!("Bearer {token}").parse() {
                        r.metadata_mut().insert("authorization", v);
                    }
                    match client.certify(r).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                    i += concurrency;
                }
            }));
        }
        let t = Instant::now();
        for task in tasks {
            task.await?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "gRPC+TLS certify, server on 1 core, {concurrency} in flight: {:.0}/s ({} ok, {} errors in {secs:.1}s)",
            done.load(Ordering::Relaxed) as f64 / secs,
            done.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );

        // 3. Proxy start to first certificate (new key, new TLS connection each time).
        let mut samples = Vec::new();
        for _ in 0..30 {
            let cfg = IdentityConfig::new(
                url.clone(),
                ca_pem.clone(),
                "bench",
                "dp-1",
                TokenSource::Inline(token.clone()),
            );
            let t = Instant::now();
            let id = Identity::new(cfg, Arc::new(Metrics::new()));
            let mut updates = id.subscribe();
            let task = id.spawn();
            updates.changed().await?;
            samples.push(t.elapsed());
            task.abort();
        }
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "proxy start to first certificate (30 runs): median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            ms(samples[samples.len() / 2]),
            ms(samples[samples.len() * 9 / 10]),
            ms(samples[samples.len() - 1])
        );
        anyhow::Ok(())
    })?;
    Ok(())
}
