//! The request path's telemetry allocates nothing once warm: a counting global allocator
//! (this test binary only) counts the allocations made on this thread while requests are
//! begun and finished with tracing and access logs off.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};
use weft_proxy::telemetry::{Direction, Telemetry, TelemetrySettings};

struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    if ON.try_with(Cell::get).unwrap_or(false) {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    COUNT.with(|c| c.set(0));
    ON.with(|o| o.set(true));
    f();
    ON.with(|o| o.set(false));
    COUNT.with(Cell::get)
}

#[test]
fn the_counter_sees_allocations() {
    let n = allocations(|| {
        let v = std::hint::black_box(vec![1u8; 64]);
        drop(v);
    });
    assert_eq!(n, 1);
}

#[test]
fn recording_a_request_allocates_nothing_once_warm() {
    let telemetry = Telemetry::new();
    telemetry
        .apply(&TelemetrySettings {
            mesh: "default".into(),
            service: "web".into(),
            services: vec!["backend".into(), "web".into()],
            tracing: None,
            logging: None,
        })
        .expect("apply");
    let uri = Uri::from_static("/api/items");
    let mut headers = HeaderMap::new();
    let web: Arc<str> = Arc::from("web");
    let round = |headers: &mut HeaderMap| {
        for (direction, service) in [
            (Direction::Outbound, "backend"),
            (Direction::Inbound, "web"),
            (Direction::Outbound, "not-in-the-snapshot"),
        ] {
            let mut o =
                telemetry.begin(direction, service, Some(&web), &Method::GET, &uri, headers);
            o.status(200);
            o.finish(100, 2000, None);
            // Dropped unfinished: recorded as aborted, still without allocating.
            let mut o = telemetry.begin(direction, service, None, &Method::POST, &uri, headers);
            o.status(503);
            drop(o);
        }
    };
    // Warm-up: each (service, code) series is resolved once, with a lock and an allocation
    // (which also shows the counter sees the telemetry's own allocations).
    let warm = allocations(|| round(&mut headers));
    assert!(warm > 0, "the first request of a series resolves it");
    let n = allocations(|| {
        for _ in 0..10_000 {
            round(&mut headers);
        }
    });
    assert_eq!(n, 0, "allocations on the warm request path");
    assert_eq!(telemetry.totals(), (60_006, 30_003));
}
