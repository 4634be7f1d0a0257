//! `weft-control`: the weft control plane.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use weft_control::run::{RunConfig, RunError, start};

#[derive(Parser)]
#[command(
    name = "weft-control",
    version,
    about = "weft's control plane: resource store, REST API, mesh identity and discovery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of the embedded store and generated files.
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "./weft-data")]
    data_dir: PathBuf,
    /// Store URL: sqlite://PATH (default: <data-dir>/weft.db), or postgres://USER:PASSWORD@HOST:PORT/DB
    /// (or libpq's key-value form, host=… dbname=…) for a store several control-plane replicas
    /// share. TLS: sslmode, sslrootcert, sslcert, sslkey. The URL may also come from
    /// WEFT_STORE, which keeps the password out of the process list.
    #[arg(long, env = "WEFT_STORE")]
    store: Option<String>,
    /// REST API address.
    #[arg(long, env = "WEFT_API_ADDRESS", default_value = "127.0.0.1:5681")]
    api_address: SocketAddr,
    /// Dataplane gRPC server address (discovery and identity).
    #[arg(long, env = "WEFT_DP_SERVER_ADDRESS", default_value = "0.0.0.0:5678")]
    dp_server_address: SocketAddr,
    /// Extra name or IP for the dataplane server's certificate (repeatable).
    #[arg(
        long = "dp-server-san",
        env = "WEFT_DP_SERVER_SANS",
        value_delimiter = ','
    )]
    dp_server_sans: Vec<String>,
    /// Your own certificate (PEM) for the dataplane server, instead of weft's CA.
    #[arg(
        long,
        env = "WEFT_DP_SERVER_CERT_FILE",
        requires = "dp_server_key_file"
    )]
    dp_server_cert_file: Option<PathBuf>,
    /// The key (PEM) of --dp-server-cert-file.
    #[arg(
        long,
        env = "WEFT_DP_SERVER_KEY_FILE",
        requires = "dp_server_cert_file"
    )]
    dp_server_key_file: Option<PathBuf>,
    /// Do not create the `default` mesh on first start.
    #[arg(long, env = "WEFT_NO_DEFAULT_MESH")]
    no_default_mesh: bool,
    /// Lets non-loopback callers mutate through the API with `Authorization: Bearer <token>`.
    #[arg(long, env = "WEFT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Run(args) = cli.command;
    init_logging(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-control: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-control: {e:#}");
            let bind = e
                .downcast_ref::<RunError>()
                .is_some_and(|r| matches!(r, RunError::Bind { .. }));
            ExitCode::from(if bind { 2 } else { 1 })
        }
    }
}

fn init_logging(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = RunConfig {
        data_dir: args.data_dir,
        store_url: args.store,
        api_address: args.api_address,
        dp_server_address: args.dp_server_address,
        dp_server_sans: args.dp_server_sans,
        dp_server_cert: args.dp_server_cert_file.zip(args.dp_server_key_file),
        no_default_mesh: args.no_default_mesh,
        admin_token: args.admin_token,
        dp_keepalive: weft_control::run::DEFAULT_DP_KEEPALIVE,
    };
    let mut cp = start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = cp.wait() => r.context("the control plane's server failed")?,
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; shutting down"); cp.shutdown().await; }
        _ = term.recv() => { tracing::info!("SIGTERM; shutting down"); cp.shutdown().await; }
    }
    Ok(())
}
