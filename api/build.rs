//! Compiles weft's protobuf services with protox (pure Rust, no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos: Vec<std::path::PathBuf> = std::fs::read_dir("proto/weft/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=proto/weft/v1");
    if protos.is_empty() {
        return Ok(());
    }
    let fds = protox::compile(&protos, ["proto"])?;
    // BTreeMap keeps map fields in a fixed order, so equal snapshots encode to equal bytes.
    // JSON views of messages (proxy admin /config, REST _config) come from serde.
    tonic_prost_build::configure()
        .btree_map(".")
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .type_attribute(".", "#[serde(rename_all = \"camelCase\")]")
        .compile_fds(fds)?;
    Ok(())
}
