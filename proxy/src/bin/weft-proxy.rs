//! `weft-proxy`: the weft sidecar.
//!
//! Exit status: 0 after a clean drain; 1 invalid input; 2 cannot bind a port.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use weft_proxy::DataPathOptions;
use weft_proxy::run::{RunConfig, RunError, run};

#[derive(Parser)]
#[command(name = "weft-proxy", version, about = "weft's sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run(Args),
}

#[derive(clap::Args)]
struct Args {
    /// The control plane's dataplane server; with several control-plane replicas, their
    /// addresses comma-separated (the proxy moves on to the next when one fails).
    #[arg(
        long,
        env = "WEFT_CP_ADDRESS",
        default_value = "https://localhost:5678"
    )]
    cp_address: String,
    /// The control plane's CA certificate (its <data-dir>/cp-ca.pem).
    #[arg(long, env = "WEFT_CA_CERT_FILE")]
    ca_cert_file: PathBuf,
    /// The Dataplane resource (YAML or JSON); `{{ key }}` placeholders take --dataplane-var.
    #[arg(long, env = "WEFT_DATAPLANE_FILE")]
    dataplane_file: PathBuf,
    /// A template value, key=value (repeatable).
    #[arg(long = "dataplane-var", env = "WEFT_DATAPLANE_VARS", value_delimiter = ',', value_parser = parse_var)]
    dataplane_vars: Vec<(String, String)>,
    /// The dataplane token file.
    #[arg(long, env = "WEFT_DATAPLANE_TOKEN_FILE")]
    dataplane_token_file: PathBuf,
    /// Admin endpoint: a loopback address (it has no authentication; others are refused).
    #[arg(long, env = "WEFT_ADMIN_ADDRESS", default_value = "127.0.0.1:9901")]
    admin_address: SocketAddr,
    /// How long in-flight connections may take to finish on SIGTERM.
    #[arg(long, env = "WEFT_DRAIN_TIME", default_value = "30s", value_parser = parse_duration)]
    drain_time: Duration,
    /// How often to report traffic totals to the control plane (`weftctl inspect dataplanes`).
    #[arg(long, env = "WEFT_STATS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    stats_interval: Duration,
    /// How long protocol detection waits for the client's first bytes.
    #[arg(long, env = "WEFT_DETECT_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    detect_timeout: Duration,
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected key=value"))?;
    Ok((k.trim().to_string(), v.to_string()))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    weft_api::duration::parse_duration(s).map_err(|e| e.to_string())
}

/// Raises the soft limit on open files to the hard limit. Every proxied connection holds two
/// sockets, and most init systems and shells start processes with a soft limit of 1024 (the
/// hard limit being far higher), which would cap a sidecar near 500 connections.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // The kernel refuses more than `fs.nr_open` (1 Mi by default), also under an infinite
    // hard limit.
    const NR_OPEN_DEFAULT: u64 = 1 << 20;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open files limit");
            return;
        }
    };
    let target = hard.min(NR_OPEN_DEFAULT);
    if soft >= target {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => tracing::debug!(from = soft, to = target, "raised the open files limit"),
        Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit"),
    }
}

fn main() -> ExitCode {
    let Command::Run(args) = Cli::parse().command;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    raise_open_files_limit();
    let cfg = RunConfig {
        cp_address: args.cp_address,
        ca_cert_file: args.ca_cert_file,
        dataplane_file: args.dataplane_file,
        dataplane_vars: args.dataplane_vars,
        token_file: args.dataplane_token_file,
        admin_address: args.admin_address,
        drain_time: args.drain_time,
        stats_interval: args.stats_interval,
        options: DataPathOptions {
            detect_timeout: args.detect_timeout,
            ..DataPathOptions::default()
        },
    };
    // On one CPU (a sidecar pinned to a core, or a container limited to one) a
    // current-thread runtime saves the work-stealing scheduler's cross-thread wake-ups.
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-proxy: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ RunError::Invalid(_)) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::from(1)
        }
        Err(e @ RunError::Bind { .. }) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::from(2)
        }
    }
}
