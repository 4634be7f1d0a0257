//! The README's first command, `./demo/run.sh`, as root: transparent interception in two
//! network namespaces, with web's plain calls to backend's address answered through both
//! sidecars. Runs the script on the binaries `cargo test --workspace` built, waits for three
//! `HTTP 200` lines, checks the interception rules sit in web's namespace (and not on the
//! host), stops it as Ctrl-C would, and checks it left no namespace behind. A guard stops the
//! script's whole process group and deletes the namespaces if the test fails midway.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const NAMESPACES: [&str; 2] = ["weft-demo-web", "weft-demo-backend"];

/// How long the demo may take to stop after Ctrl-C: its cleanup gives processes 5 s before
/// SIGKILL, then deletes namespaces and links.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// The processes of process group `pgid`, one line each (empty: none).
fn process_group(pgid: u32) -> String {
    let pids = Command::new("pgrep")
        .args(["-g", &pgid.to_string()])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    if pids.is_empty() {
        return String::new();
    }
    Command::new("ps")
        .args([
            "--no-headers",
            "-o",
            "pid,stat,etime,wchan:24,args",
            "-p",
            &pids,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The directory of the workspace's debug binaries: this test runs from `<dir>/deps/`.
fn bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.to_path_buf();
    [
        "weft-control",
        "weftctl",
        "weft-proxy",
        "weft-iptables",
        "weft-bench",
    ]
    .iter()
    .all(|b| dir.join(b).exists())
    .then_some(dir)
}

fn namespaces() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The running demo; dropping it stops the script's process group and removes what it built.
struct Demo {
    child: Child,
    stopped: bool,
}

impl Demo {
    /// Stops it as Ctrl-C would and waits for its own cleanup (bounded).
    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let pgid = Pid::from_raw(i32::try_from(self.child.id()).ok()?);
        let _ = killpg(pgid, Signal::SIGINT);
        let deadline = Instant::now() + STOP_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.stopped = true;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.interrupt();
        }
        // Whatever of the group is still there (the script's background processes ignore
        // SIGINT, as a non-interactive shell's do): gone, or it would outlive its namespace.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if !self.stopped {
            let _ = self.child.wait();
        }
        for ns in NAMESPACES {
            if namespaces().contains(ns) {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
}

/// The nat table of a namespace (`None`: the host's).
fn nat_rules(netns: Option<&str>) -> String {
    let out = match netns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "iptables-save", "-t", "nat"])
            .output(),
        None => Command::new("iptables-save").args(["-t", "nat"]).output(),
    }
    .expect("iptables-save runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_demo_mesh_runs_transparently_as_root_and_cleans_up() {
    const NAME: &str = "the_demo_mesh_runs_transparently_as_root_and_cleans_up";
    if !weft_tests::is_root() {
        weft_tests::skipped(&format!("{NAME}: needs root"));
        return;
    }
    let Some(bins) = bin_dir() else {
        weft_tests::skipped(&format!(
            "{NAME}: the weft binaries are not built (cargo test --workspace builds them)"
        ));
        return;
    };
    for ns in NAMESPACES {
        assert!(
            !namespaces().contains(ns),
            "{ns} exists already: is a demo running?"
        );
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/run.sh");
    // The API on a free port, so a control plane already on 5681 does not get in the way.
    let api = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let child = {
        use std::os::unix::process::CommandExt;
        // With SIGINT at its default: a shell started with it ignored (as everything under a
        // `nohup ... &` is) cannot trap it, and Ctrl-C would not stop the demo.
        Command::new("env")
            .args(["--default-signal=INT", "bash"])
            .arg(&script)
            .env("WEFT_DEMO_MODE", "transparent")
            .env("WEFT_DEMO_BIN_DIR", &bins)
            .env("WEFT_DEMO_API", api.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("bash runs demo/run.sh")
    };
    let mut demo = Demo {
        child,
        stopped: false,
    };
    let (lines_tx, lines) = mpsc::channel();
    let stdout = demo.child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut ok, mut seen) = (0, Vec::new());
    while ok < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if line.contains("web -> backend: HTTP 200") {
                    ok += 1;
                }
                seen.push(line);
            }
            Err(_) => panic!(
                "no three `HTTP 200` calls within 90 s; the demo printed:\n{}",
                seen.join("\n")
            ),
        }
    }
    let out = seen.join("\n");
    assert!(out.contains("transparent mode"), "{out}");

    // Interception lives in web's namespace, not on the host.
    let web = nat_rules(Some("weft-demo-web"));
    assert!(
        web.contains("15001"),
        "no outbound redirect in web's namespace:\n{web}"
    );
    assert!(
        !nat_rules(None).contains("15001"),
        "the demo put interception rules on the host"
    );

    let stopping = Instant::now();
    let pgid = demo.child.id();
    let Some(status) = demo.interrupt() else {
        let after: Vec<String> = lines.try_iter().collect();
        panic!(
            "the demo did not stop within {STOP_WITHIN:?} of Ctrl-C; it printed since:\n{}\n\
             its processes:\n{}",
            after.join("\n"),
            process_group(pgid)
        );
    };
    eprintln!("the demo stopped {:?} after Ctrl-C", stopping.elapsed());
    let left = process_group(pgid);
    assert!(
        left.is_empty(),
        "processes of the demo left behind:\n{left}"
    );
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    let left = namespaces();
    for ns in NAMESPACES {
        assert!(!left.contains(ns), "{ns} left behind:\n{left}");
    }
}
