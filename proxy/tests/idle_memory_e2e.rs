//! Issue 6, "Limits": per-connection memory is bounded. 10,000 concurrent idle mesh mTLS
//! connections through a pair of transparent sidecars (the real binaries, in namespaces, as in
//! `mesh_e2e.rs`) leave each sidecar under 64 MiB resident, and every one of them still
//! carries bytes afterwards.
//!
//! The bound is about the sidecar users run, a release build: a debug build starts about
//! 15 MiB higher (unoptimised code pages and deeper stacks). So the sidecars run
//! `WEFT_RELEASE_PROXY` (a release `weft-proxy`, which `.ci/run` builds and sets), or this
//! test's own binary when the test itself is a release build; a debug test without it is
//! skipped, visibly. Needs root; skipped, visibly, otherwise. `WEFT_IDLE_CONNS` changes the
//! number of connections (for measuring); the test prints each sidecar's resident memory
//! before and after, and the bytes per connection.

#[macro_use]
#[allow(unused_imports)] // the harness re-exports helpers this test does not need
mod e2e;

use e2e::{
    ControlPlane, Sidecar, ThreeHosts, WAIT, mesh_yaml, permission_yaml, request_from, vm_rss_kib,
    wait_for,
};
use futures::stream::{self, StreamExt, TryStreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
/// The bound of issue 6.
const CONNS: usize = 10_000;
const RSS_LIMIT_KIB: u64 = 64 * 1024;
/// Connections being opened at once.
const OPENING: usize = 200;
/// File descriptors of a process besides its connections' sockets.
const FDS_SPARE: u64 = 512;
/// How long opening (or checking) all connections may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn ten_thousand_idle_mtls_connections_stay_under_64_mib_per_sidecar() {
    const NAME: &str = "ten_thousand_idle_mtls_connections_stay_under_64_mib_per_sidecar";
    let mut env = env_or_skip!(NAME);
    // The app is `weft-bench serve`'s TCP echo, in a process of its own, so that this
    // process holds one socket per connection, not both ends.
    let bench = env.bins.proxy.with_file_name("weft-bench");
    assert!(
        bench.exists(),
        "{} is missing: run `cargo test --workspace` or `cargo build --workspace --bins` first",
        bench.display()
    );
    match std::env::var_os("WEFT_RELEASE_PROXY") {
        Some(release) => env.bins.proxy = release.into(),
        None if cfg!(debug_assertions) => {
            weft_tests::skipped(&format!(
                "{NAME}: the bound is for a release weft-proxy; build one \
                 (`cargo build --release -p weft-proxy`) and set WEFT_RELEASE_PROXY to it"
            ));
            return;
        }
        None => {}
    }
    let wanted: usize = std::env::var("WEFT_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CONNS);
    // This process holds the client end of every connection, the app and each sidecar one
    // socket per connection; they inherit the limits (and raise their soft limit to the hard
    // one). Without CAP_SYS_RESOURCE the hard limit cannot grow: then as many connections as
    // it allows are opened, and the resident memory for `wanted` is also projected from them.
    let fds = raise_open_files_limit(wanted as u64 + FDS_SPARE);
    let conns = wanted.min(fds.saturating_sub(FDS_SPARE) as usize);
    if conns < wanted {
        weft_tests::skipped(&format!(
            "{wanted} connections: the open files limit is {fds} and cannot be raised here \
             (no CAP_SYS_RESOURCE); measuring {conns} and projecting to {wanted}"
        ));
    }

    let hosts = ThreeHosts::new(&env);
    let (cp_host, client_host, server_host) = (&hosts.cp, &hosts.client, &hosts.server);
    let cp = ControlPlane::start(&env, cp_host);
    cp.apply(
        env.dir(),
        &format!(
            "{}---\n{}",
            mesh_yaml("alpha", true, "24h"),
            permission_yaml("alpha", "client-to-server", "client", "server")
        ),
    );
    let mut app_cmd = std::process::Command::new(&bench);
    app_cmd.args([
        "serve",
        "--tcp",
        &format!("0.0.0.0:{APP_PORT}"),
        "--threads",
        "1",
    ]);
    let _app = server_host.spawn(app_cmd).expect("start the echo app");
    let server = Sidecar::start(
        &env,
        &cp,
        server_host,
        "alpha",
        "server",
        "server",
        APP_PORT,
    );
    let client = Sidecar::start(
        &env,
        &cp,
        client_host,
        "alpha",
        "client",
        "client",
        APP_PORT,
    );
    let to = SocketAddr::from((server_host.ip(), APP_PORT));
    // Until the client's sidecar knows the server's endpoint, a connection would be passed
    // through in plaintext (and refused by the STRICT inbound).
    wait_for("the client's sidecar to reach the server", WAIT, || {
        request_from(client_host, to, "warm-up").is_ok_and(|r| r == "warm-up")
    });
    let sidecars = [("client", &client), ("server", &server)];
    let before = sidecars.map(|(_, s)| vm_rss_kib(s.pid()));

    // Opened from inside the client's host, so its iptables rules send every connection
    // through its sidecar; the runtime comes back out with the sockets to check them later.
    let started = Instant::now();
    let (rt, mut open) = client_host
        .enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let open = rt.block_on(open_all(to, conns));
            (rt, open)
        })
        .expect("enter the client host");
    let open = open
        .as_mut()
        .unwrap_or_else(|e| panic!("opening {conns} connections: {e}"));
    eprintln!(
        "opened {conns} connections through both sidecars in {:.1?}",
        started.elapsed()
    );
    // Let the sidecars settle (post-handshake messages, buffers given back).
    std::thread::sleep(Duration::from_millis(500));

    let after = sidecars.map(|(_, s)| vm_rss_kib(s.pid()));
    let mut over = Vec::new();
    for (i, (name, sidecar)) in sidecars.iter().enumerate() {
        let per_conn = after[i].saturating_sub(before[i]) * 1024 / conns as u64;
        let projected = before[i] + per_conn * wanted as u64 / 1024;
        eprintln!(
            "{name} sidecar: VmRSS {} KiB -> {} KiB with {conns} idle connections \
             ({per_conn} B per connection; {projected} KiB projected for {wanted}); {}",
            before[i],
            after[i],
            resident_kinds(sidecar.pid())
        );
        if after[i] >= RSS_LIMIT_KIB || projected >= RSS_LIMIT_KIB {
            over.push(format!(
                "the {name} sidecar holds {} KiB with {conns} idle connections, {projected} KiB \
                 projected for {wanted}",
                after[i]
            ));
        }
    }
    assert!(over.is_empty(), "{over:?} (limit {RSS_LIMIT_KIB} KiB)");

    let started = Instant::now();
    rt.block_on(echo_all(open))
        .unwrap_or_else(|e| panic!("after idling: {e}"));
    eprintln!(
        "every connection echoed a byte again in {:.1?}",
        started.elapsed()
    );
}

/// Raises this process's open files limit towards `need` (the hard limit too, when allowed)
/// and returns the limit it got.
fn raise_open_files_limit(need: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= need {
        return soft;
    }
    if hard < need && setrlimit(Resource::RLIMIT_NOFILE, need, need).is_ok() {
        return need;
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the soft limit");
    hard
}

/// Anonymous and file-backed resident memory of a process (`/proc/<pid>/smaps_rollup`).
fn resident_kinds(pid: u32) -> String {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "anonymous {}, file-backed {}",
        field("Anonymous:"),
        field("Pss_File:")
    )
}

/// Opens `n` connections to `to`, each of which has carried one byte there and back.
async fn open_all(to: SocketAddr, n: usize) -> Result<Vec<TcpStream>, String> {
    let opening = stream::iter(0..n)
        .map(|i| async move {
            let open = async {
                let mut s = TcpStream::connect(to).await?;
                s.set_nodelay(true)?;
                s.write_all(b"o").await?;
                expect_byte(&mut s, b'o').await?;
                Ok::<_, std::io::Error>(s)
            };
            match tokio::time::timeout(WAIT, open).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(format!("connection {i}: {e}")),
                Err(_) => Err(format!("connection {i}: no echo within {WAIT:?}")),
            }
        })
        .buffer_unordered(OPENING)
        .try_collect();
    tokio::time::timeout(PHASE_TIMEOUT, opening)
        .await
        .map_err(|_| format!("not all open within {PHASE_TIMEOUT:?}"))?
}

/// Sends one byte on every connection, then reads every echo.
async fn echo_all(conns: &mut [TcpStream]) -> Result<(), String> {
    let check = async {
        for (i, s) in conns.iter_mut().enumerate() {
            s.write_all(b"e")
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
        }
        for (i, s) in conns.iter_mut().enumerate() {
            expect_byte(s, b'e')
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
        }
        Ok(())
    };
    tokio::time::timeout(PHASE_TIMEOUT, check)
        .await
        .map_err(|_| format!("no echo on every connection within {PHASE_TIMEOUT:?}"))?
}

async fn expect_byte(s: &mut TcpStream, want: u8) -> std::io::Result<()> {
    let mut got = [0u8; 1];
    s.read_exact(&mut got).await?;
    if got[0] != want {
        return Err(std::io::Error::other(format!(
            "echoed {:?}, not {:?}",
            got[0] as char, want as char
        )));
    }
    Ok(())
}
