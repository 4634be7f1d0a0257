//! Requests on a mesh connection leave no memory behind: a global allocator that keeps the
//! live byte count (this test binary only) watches thousands of requests with bodies go
//! through `MeshSender` to an in-memory HTTP/2 server. Each such request spawns a task to
//! move its body; a task whose handle is leaked instead of dropped stays allocated forever,
//! which is how `weft-bench mesh` once saw the outbound sidecar grow to 167 MiB under gRPC.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use weft_proxy::http::body::Body;
use weft_proxy::http::mesh_stream::{MeshSender, RequestTimeout};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only keeps the live byte count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Answers every request with its body's length once the body has all come.
async fn serve(io: tokio::io::DuplexStream) {
    let mut conn = h2::server::handshake(io).await.expect("server handshake");
    while let Some(Ok((req, mut reply))) = conn.accept().await {
        tokio::spawn(async move {
            let mut body = req.into_body();
            let mut n = 0;
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                n += chunk.len();
            }
            if let Ok(mut stream) = reply.send_response(Response::new(()), false) {
                let _ = stream.send_data(Bytes::from(n.to_string()), true);
            }
        });
    }
}

async fn post(sender: &MeshSender) {
    let mut req = Request::new(Body::text("a request body, sent by a task of its own"));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = "http://backend.mesh/echo".parse().expect("static URI");
    // With the request timeout, as the outbound proxy sends.
    let timeout = RequestTimeout {
        began: std::time::Instant::now(),
        limit: std::time::Duration::from_secs(15),
        idle: std::time::Duration::from_secs(1800),
    };
    let (response, open) = sender
        .clone()
        .send(req, Some(timeout))
        .await
        .expect("response");
    let body = Body::stream(response.into_body(), Some(open));
    let got = body.collect().await.expect("body").to_bytes();
    assert_eq!(got, "41");
}

#[test]
fn requests_with_bodies_leave_no_memory_behind() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve(theirs));
        let (tx, conn) = h2::client::handshake(ours).await.expect("client handshake");
        let sender = MeshSender::spawn(tx, conn, ([127, 0, 0, 1], 1).into(), ());
        // Warm: h2's stream store, HPACK tables and the runtime's queues reach their size.
        for _ in 0..500 {
            post(&sender).await;
        }
        let before = LIVE.load(Ordering::Relaxed);
        for _ in 0..5_000 {
            post(&sender).await;
        }
        let grown = LIVE.load(Ordering::Relaxed) - before;
        // A leaked body task is several hundred bytes: 5,000 of them are megabytes.
        assert!(
            grown < 64 * 1024,
            "{grown} bytes still allocated after 5,000 requests"
        );
    });
}
