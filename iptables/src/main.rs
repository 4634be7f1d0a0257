//! `weft-iptables`: installs, removes and shows weft's transparent-proxy
//! rules. Exit code 0 on success, 1 on invalid input or any failure.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use weft_iptables::{Change, Config, ModeChoice, config, ebpf};

/// Installs, removes and shows weft's transparent-proxy iptables rules.
#[derive(Debug, Parser)]
#[command(name = "weft-iptables", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the rules (replacing any earlier weft rules, atomically).
    Install,
    /// Remove every weft rule and chain, and nothing else.
    Uninstall,
    /// Print the weft rules that are installed.
    Show,
    /// The eBPF acceleration of local hops: connections between two sockets of this host in
    /// one network namespace (an app and its sidecar) skip the TCP/IP stack. Needs bpftool,
    /// a cgroup v2 mount and a bpf filesystem.
    Ebpf {
        #[command(subcommand)]
        action: EbpfCmd,
        #[command(flatten)]
        opts: EbpfOpts,
    },
}

#[derive(Debug, Subcommand)]
enum EbpfCmd {
    /// Load, pin and attach the programs (replacing an earlier install of the same name).
    Install,
    /// Detach the programs and remove their pins.
    Uninstall,
    /// Print whether the programs are installed, what the cgroup has attached, and whether
    /// this network namespace is registered for the connect redirect.
    Show,
    /// Register this network namespace for transparent mode's connect redirect: its apps'
    /// outbound TCP connections go straight to the proxy's outbound port on 127.0.0.1 when
    /// they connect (the same ones, by the same flags, as the iptables rules of `install`,
    /// which stay as the fallback), so the app's hop to its sidecar is redirected too. Needs
    /// `ebpf install` on a cgroup holding the apps and the proxy.
    Transparent {
        /// Take this network namespace out instead.
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Debug, Args)]
struct EbpfOpts {
    /// The cgroup v2 directory whose processes' sockets are accelerated (default: the first
    /// cgroup2 mount, i.e. every process of the host).
    #[arg(long, global = true, env = "WEFT_EBPF_CGROUP_PATH")]
    cgroup_path: Option<PathBuf>,
    /// A mounted bpf filesystem to pin the programs in (default: the first bpf mount).
    #[arg(long, global = true, env = "WEFT_EBPF_BPFFS_PATH")]
    bpffs_path: Option<PathBuf>,
    /// The directory under the bpf filesystem for this install's pins.
    #[arg(long, global = true, env = "WEFT_EBPF_NAME", default_value = ebpf::DEFAULT_NAME)]
    name: String,
    /// The bpftool binary.
    #[arg(long, global = true, env = "WEFT_BPFTOOL", default_value = "bpftool")]
    bpftool: PathBuf,
}

impl EbpfOpts {
    fn config(&self) -> anyhow::Result<ebpf::EbpfConfig> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let cgroup = match &self.cgroup_path {
            Some(p) => p.clone(),
            None => ebpf::first_mount(&mounts, "cgroup2").context(
                "no cgroup2 mount here: mount one (mount -t cgroup2 none <dir>) or pass --cgroup-path",
            )?,
        };
        let bpffs = match &self.bpffs_path {
            Some(p) => p.clone(),
            None => ebpf::first_mount(&mounts, "bpf").context(
                "no bpf filesystem mounted: mount one (mount -t bpf bpf /sys/fs/bpf) or pass --bpffs-path",
            )?,
        };
        let mut cfg = ebpf::EbpfConfig::new(cgroup, bpffs);
        cfg.name.clone_from(&self.name);
        cfg.bpftool.clone_from(&self.bpftool);
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
struct Opts {
    /// Port of the proxy's outbound listener.
    #[arg(long, global = true, env = "WEFT_REDIRECT_OUTBOUND_PORT", default_value_t = config::DEFAULT_OUTBOUND_PORT)]
    redirect_outbound_port: u16,
    /// Port of the proxy's inbound listener.
    #[arg(long, global = true, env = "WEFT_REDIRECT_INBOUND_PORT", default_value_t = config::DEFAULT_INBOUND_PORT)]
    redirect_inbound_port: u16,
    /// Uid the proxy runs as; its traffic is not redirected.
    #[arg(long, global = true, env = "WEFT_PROXY_UID", default_value_t = config::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// Inbound TCP ports that bypass the proxy (comma separated).
    #[arg(
        long,
        global = true,
        env = "WEFT_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ','
    )]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound TCP ports that bypass the proxy (comma separated).
    #[arg(
        long,
        global = true,
        env = "WEFT_EXCLUDE_OUTBOUND_PORTS",
        value_delimiter = ','
    )]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs that bypass the proxy (comma separated).
    #[arg(
        long,
        global = true,
        env = "WEFT_EXCLUDE_OUTBOUND_IPS",
        value_delimiter = ','
    )]
    exclude_outbound_ips: Vec<IpNet>,
    /// Redirect UDP port 53 to the proxy's DNS port.
    #[arg(long, global = true, env = "WEFT_REDIRECT_DNS")]
    redirect_dns: bool,
    /// Port of the proxy's DNS listener.
    #[arg(long, global = true, env = "WEFT_REDIRECT_DNS_PORT", default_value_t = config::DEFAULT_DNS_PORT)]
    redirect_dns_port: u16,
    /// Also handle IPv6 with ip6tables (loop guard `::6`).
    #[arg(long, global = true, env = "WEFT_IPV6")]
    ipv6: bool,
    /// Print the iptables-restore input instead of applying it.
    #[arg(long, global = true, env = "WEFT_DRY_RUN")]
    dry_run: bool,
    /// Which iptables to use: nft, legacy, or auto (detect).
    #[arg(
        long,
        global = true,
        env = "WEFT_IPTABLES_MODE",
        default_value = "auto"
    )]
    iptables_mode: ModeChoice,
}

impl Opts {
    fn config(&self) -> Config {
        Config {
            redirect_outbound_port: self.redirect_outbound_port,
            redirect_inbound_port: self.redirect_inbound_port,
            proxy_uid: self.proxy_uid,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_ips: self.exclude_outbound_ips.clone(),
            redirect_dns: self.redirect_dns,
            redirect_dns_port: self.redirect_dns_port,
            ipv6: self.ipv6,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-iptables: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let o = &cli.opts;
    match &cli.command {
        Cmd::Install => {
            let changes = weft_iptables::install(&o.config(), o.iptables_mode, o.dry_run)
                .context("install failed")?;
            report(&changes, o.dry_run, "installed");
        }
        Cmd::Uninstall => {
            let changes = weft_iptables::uninstall(o.ipv6, o.iptables_mode, o.dry_run)
                .context("uninstall failed")?;
            report(&changes, o.dry_run, "removed");
        }
        Cmd::Show => {
            for installed in weft_iptables::show(o.ipv6, o.iptables_mode).context("show failed")? {
                println!("# {} (iptables-{})", installed.family, installed.mode);
                if installed.rules.is_empty() {
                    println!("# no weft rules installed");
                } else {
                    print!("{}", installed.rules);
                }
            }
        }
        Cmd::Ebpf { action, opts } => {
            let cfg = opts.config()?;
            match action {
                EbpfCmd::Install => {
                    ebpf::install(&cfg).context("ebpf install failed")?;
                    eprintln!(
                        "weft-iptables: eBPF local redirect attached to {} (pinned in {})",
                        cfg.cgroup.display(),
                        cfg.pin_dir().display()
                    );
                }
                EbpfCmd::Uninstall => {
                    ebpf::uninstall(&cfg).context("ebpf uninstall failed")?;
                    eprintln!("weft-iptables: eBPF local redirect removed");
                }
                EbpfCmd::Show => {
                    let installed = cfg.pin_dir().exists()
                        && ebpf::is_attached(&cfg).context("ebpf show failed")?;
                    println!(
                        "# eBPF local redirect: {} ({}; programs {})",
                        if installed {
                            "installed"
                        } else {
                            "not installed"
                        },
                        cfg.cgroup.display(),
                        if ebpf::available() {
                            "built in"
                        } else {
                            "not built in: no clang at build time"
                        }
                    );
                    print!(
                        "{}",
                        ebpf::attached_programs(&cfg).context("ebpf show failed")?
                    );
                    if installed {
                        let registered =
                            ebpf::transparent_registered(&cfg).context("ebpf show failed")?;
                        println!(
                            "# connect redirect: this network namespace is {}",
                            if registered {
                                "registered"
                            } else {
                                "not registered"
                            }
                        );
                    }
                }
                EbpfCmd::Transparent { remove: true } => {
                    ebpf::unregister_transparent(&cfg).context("ebpf transparent failed")?;
                    eprintln!(
                        "weft-iptables: this network namespace's connections go through iptables again"
                    );
                }
                EbpfCmd::Transparent { remove: false } => {
                    let addrs = ebpf::local_ipv4_addrs().context("ebpf transparent failed")?;
                    let mut config = o.config();
                    config.proxy_uid =
                        ebpf::kernel_uid(config.proxy_uid).context("ebpf transparent failed")?;
                    let conf = ebpf::TransparentConf::new(&config, addrs)
                        .context("ebpf transparent failed")?;
                    ebpf::register_transparent(&cfg, &conf).context("ebpf transparent failed")?;
                    eprintln!(
                        "weft-iptables: this network namespace's outbound connections go to \
                         127.0.0.1:{} when they connect",
                        conf.outbound_port
                    );
                }
            }
        }
    }
    Ok(())
}

fn report(changes: &[Change], dry_run: bool, verb: &str) {
    for c in changes {
        if let Some(note) = &c.note {
            eprintln!("weft-iptables: {} : {note}", c.family);
        }
        let mode = c
            .mode
            .map(|m| format!("iptables-{m}"))
            .unwrap_or_else(|| "iptables".into());
        match (&c.input, dry_run) {
            (Some(input), true) => print!("{input}"),
            (Some(_), false) => eprintln!("weft-iptables: {} rules {verb} ({mode})", c.family),
            (None, _) => eprintln!(
                "weft-iptables: {}: no weft rules installed ({mode})",
                c.family
            ),
        }
    }
}
