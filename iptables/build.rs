//! Compiles the eBPF programs of `weft-iptables ebpf` (`bpf/local_redirect.bpf.c`) with
//! clang when it is installed (Debian: `clang libbpf-dev`). Without clang the crate still
//! builds, and `weft-iptables ebpf install` says that this build has no eBPF programs.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "bpf/local_redirect.bpf.c";
    println!("cargo::rerun-if-changed={source}");
    println!("cargo::rerun-if-env-changed=WEFT_CLANG");
    println!("cargo::rustc-check-cfg=cfg(weft_bpf)");
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let clang = env::var("WEFT_CLANG").unwrap_or_else(|_| "clang".into());
    let object = out_dir.join("local_redirect.bpf.o");
    // The multiarch include directory has `asm/types.h`, which `linux/bpf.h` needs.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo::rustc-cfg=weft_bpf"),
        Ok(s) => println!(
            "cargo::warning=clang failed on {source} ({s}); weft-iptables is built without eBPF programs"
        ),
        Err(e) => println!(
            "cargo::warning=no clang ({e}); weft-iptables is built without eBPF programs (apt-get install clang libbpf-dev)"
        ),
    }
}
