//! `weftctl`: the command line over weft's REST API.
//!
//! Exit status: 0 success; 1 invalid input or refused request; 2 control plane unreachable.

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use std::io::Read;
use std::process::ExitCode;
use weft_api::ResourceType;
use weft_api::parse::parse_documents;
use weft_control::client::{Client, ClientError, segment};
use weft_control::{inspect, table};

#[derive(Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Manage a weft service mesh through its control plane's REST API"
)]
struct Cli {
    /// URL of the control plane's REST API.
    #[arg(
        long,
        global = true,
        env = "WEFT_API_URL",
        default_value = "http://127.0.0.1:5681"
    )]
    api_url: String,
    /// Admin token for mutating calls from another host.
    #[arg(long, global = true, env = "WEFT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update resources from a file (or - for stdin), applied in order.
    Apply {
        /// YAML or JSON file; multi-document YAML is applied document by document.
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// Show resources: `get meshes`, `get <plural> --mesh M`, `get <plural> NAME --mesh M`.
    Get {
        /// Resource collection, e.g. meshes, dataplanes, traffic-permissions, meshhttproutes.
        kind: String,
        /// One resource by name.
        name: Option<String>,
        /// The mesh.
        #[arg(short, long, default_value = "default")]
        mesh: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show what the control plane knows about running proxies: `inspect dataplanes [--mesh M]`.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
    /// Generate credentials: `generate dataplane-token --mesh M --name N [--valid-for 24h]`.
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Revoke credentials: `revoke dataplane-token --mesh M --id ID`.
    Revoke {
        #[command(subcommand)]
        what: Revoke,
    },
    /// Delete a resource: `delete mesh NAME [--cascade]`, `delete <type> NAME --mesh M`.
    Delete {
        /// Resource type, e.g. mesh, dataplane, traffic-route, meshtrafficpermission.
        kind: String,
        /// Its name.
        name: String,
        /// The mesh.
        #[arg(short, long, default_value = "default")]
        mesh: String,
        /// Delete a mesh together with everything in it.
        #[arg(long)]
        cascade: bool,
    },
}

#[derive(Subcommand)]
enum Inspect {
    /// Each dataplane's status, last contact, request total, error rate and connection total,
    /// as its proxy last reported them (every 10 s by default).
    Dataplanes {
        /// The mesh (default: every mesh).
        #[arg(short, long)]
        mesh: Option<String>,
        /// Output format; json and yaml give the `dataplanes+insights` items.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// A token that lets one proxy register and get certificates as one dataplane of one mesh.
    DataplaneToken {
        /// The mesh.
        #[arg(short, long)]
        mesh: String,
        /// The dataplane's name.
        #[arg(long)]
        name: String,
        /// How long the token is valid, e.g. 24h, 30d (default 10y).
        #[arg(long)]
        valid_for: Option<String>,
    },
}

#[derive(Subcommand)]
enum Revoke {
    /// Revoke a dataplane token by its id; it stops working at its next use.
    DataplaneToken {
        /// The token's mesh.
        #[arg(short, long)]
        mesh: String,
        /// The token's id (printed by `generate dataplane-token` on stderr; the `jti` claim).
        #[arg(long)]
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// A failure with its exit status.
struct Failure(u8, String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::Unreachable { .. } => 2,
            ClientError::Refused { .. } | ClientError::BadUrl { .. } => 1,
        };
        Failure(code, e.to_string())
    }
}

fn main() -> ExitCode {
    // Exit codes are SPEC's: 2 means the control plane could not be reached, so a usage error
    // is 1 (clap's own would be 2); help and version are 0.
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("Error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn resource_type(kind: &str) -> Result<ResourceType, Failure> {
    ResourceType::from_any_name(kind).ok_or_else(|| {
        let known: Vec<&str> = ResourceType::ALL.iter().map(|t| t.plural()).collect();
        Failure(
            1,
            format!(
                "unknown resource type {kind:?}; expected one of {}",
                known.join(", ")
            ),
        )
    })
}

/// A resource or mesh name given on the command line: one path segment. `.` and `..` are
/// refused here (a URL would read them as the current or parent path).
fn check_name(what: &str, name: &str) -> Result<(), Failure> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(Failure(1, format!("{what} {name:?} is not a name")));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let client = Client::new(&cli.api_url, cli.admin_token)?;
    match &cli.command {
        Command::Get { name, mesh, .. } => {
            check_name("mesh", mesh)?;
            if let Some(n) = name {
                check_name("name", n)?;
            }
        }
        Command::Delete { name, mesh, .. } => {
            check_name("mesh", mesh)?;
            check_name("name", name)?;
        }
        _ => {}
    }
    match cli.command {
        Command::Apply { file } => apply(&client, &file),
        Command::Get {
            kind,
            name,
            mesh,
            output,
        } => {
            let ty = resource_type(&kind)?;
            let path = match (&name, ty) {
                (Some(n), _) => Client::path(ty, &mesh, n),
                (None, ResourceType::Mesh) => "/meshes".to_string(),
                (None, _) => format!("/meshes/{}/{}", segment(&mesh), ty.plural()),
            };
            let body = client.get(&path)?;
            print_output(ty, &body, name.is_some(), output)
        }
        Command::Inspect {
            what: Inspect::Dataplanes { mesh, output },
        } => inspect_dataplanes(&client, mesh, output),
        Command::Revoke {
            what: Revoke::DataplaneToken { mesh, id },
        } => {
            client.post_json(
                "/tokens/dataplane/revocations",
                &serde_json::json!({"mesh": mesh, "id": id}),
            )?;
            println!("revoked dataplane token {id} of mesh {mesh:?}");
            Ok(())
        }
        Command::Generate {
            what:
                Generate::DataplaneToken {
                    mesh,
                    name,
                    valid_for,
                },
        } => {
            let mut body = serde_json::json!({"mesh": mesh, "name": name});
            if let Some(v) = valid_for {
                body["validFor"] = Value::String(v);
            }
            let token = client.post_text("/tokens/dataplane", &body)?;
            if let Some(id) = token_id(&token) {
                eprintln!(
                    "token id: {id} (weftctl revoke dataplane-token --mesh {mesh} --id {id})"
                );
            }
            println!("{token}");
            Ok(())
        }
        Command::Delete {
            kind,
            name,
            mesh,
            cascade,
        } => {
            let ty = resource_type(&kind)?;
            let mesh = if ty == ResourceType::Mesh {
                name.clone()
            } else {
                mesh
            };
            let body = client.delete(ty, &mesh, &name, cascade)?;
            let n = body
                .get("deleted")
                .and_then(Value::as_array)
                .map(Vec::len)
                .unwrap_or(1);
            if n > 1 {
                println!("deleted {ty} {name:?} and {} resource(s) in it", n - 1);
            } else {
                println!("deleted {ty} {name:?}");
            }
            Ok(())
        }
    }
}

fn apply(client: &Client, file: &str) -> Result<(), Failure> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure(1, format!("reading stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure(1, format!("{file}: {e}")))?
    };
    let label = if file == "-" { "<stdin>" } else { file };
    let docs = parse_documents(&text).map_err(|e| Failure(1, format!("{label}: {e}")))?;
    if docs.is_empty() {
        return Err(Failure(1, format!("{label}: no resources found")));
    }
    for (i, doc) in docs.iter().enumerate() {
        let r = &doc.resource;
        let what = format!("{} {:?}", r.resource_type(), r.name);
        match client.put(r, doc.version) {
            Ok((_, created)) => println!("{what} {}", if created { "created" } else { "updated" }),
            Err(e @ ClientError::Refused { .. }) => {
                // A file saved with `get -o yaml` carries the version it was read at, and
                // applying it is a conditional write: say how to overwrite instead.
                let hint = match (&e, doc.version) {
                    (ClientError::Refused { status: 409, .. }, Some(v)) => format!(
                        " (the document carries `version: {v}`, so it is written only over that \
                         version; remove the line to overwrite)"
                    ),
                    _ => String::new(),
                };
                return Err(Failure(
                    1,
                    format!("{label}: document {} ({what}): {e}{hint}", i + 1),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn inspect_dataplanes(
    client: &Client,
    mesh: Option<String>,
    output: Output,
) -> Result<(), Failure> {
    let meshes = match mesh {
        Some(m) => vec![m],
        None => client
            .get("/meshes")?
            .get("items")
            .and_then(Value::as_array)
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| m.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut items = Vec::new();
    for m in &meshes {
        let body = client.get(&format!("/meshes/{}/dataplanes+insights", segment(m)))?;
        if let Some(list) = body.get("items").and_then(Value::as_array) {
            items.extend(list.iter().cloned());
        }
    }
    match output {
        Output::Table => print!(
            "{}",
            inspect::dataplanes_table(&items, std::time::SystemTime::now())
        ),
        Output::Json | Output::Yaml => {
            let body = serde_json::json!({"total": items.len(), "items": items, "next": null});
            print_output(ResourceType::Dataplane, &body, false, output)?;
        }
    }
    Ok(())
}

fn print_output(
    ty: ResourceType,
    body: &Value,
    single: bool,
    output: Output,
) -> Result<(), Failure> {
    match output {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(body).map_err(|e| Failure(1, e.to_string()))?
            );
        }
        Output::Yaml => {
            print!(
                "{}",
                serde_saphyr::to_string(body).map_err(|e| Failure(1, e.to_string()))?
            );
        }
        Output::Table => {
            let items: Vec<Value> = if single {
                vec![body.clone()]
            } else {
                body.get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            };
            print_table(ty, &items);
        }
    }
    Ok(())
}

fn print_table(ty: ResourceType, items: &[Value]) {
    let s = |v: &Value, p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (header, rows): (Vec<&str>, Vec<Vec<String>>) = match ty {
        ResourceType::Mesh => (
            vec![
                "NAME",
                "MTLS",
                "PASSTHROUGH",
                "METRICS",
                "TRACING",
                "LOGGING",
                "AGE",
            ],
            items
                .iter()
                .map(|m| {
                    let mtls = match m.pointer("/mtls/enabledBackend").and_then(Value::as_str) {
                        Some(b) if !b.is_empty() => {
                            let kind = m
                                .pointer("/mtls/backends")
                                .and_then(Value::as_array)
                                .and_then(|bs| {
                                    bs.iter()
                                        .find(|x| x.get("name").and_then(Value::as_str) == Some(b))
                                        .map(|x| s(x, "/type"))
                                });
                            format!("{}/{b}", kind.unwrap_or_default())
                        }
                        _ => "off".into(),
                    };
                    let passthrough = m
                        .pointer("/networking/outbound/passthrough")
                        .and_then(Value::as_bool)
                        .unwrap_or(true);
                    let or_off = |x: String| if x.is_empty() { "off".to_string() } else { x };
                    vec![
                        s(m, "/name"),
                        mtls,
                        if passthrough {
                            "on".into()
                        } else {
                            "off".into()
                        },
                        or_off(s(m, "/metrics/enabledBackend")),
                        or_off(s(m, "/tracing/defaultBackend")),
                        or_off(s(m, "/logging/defaultBackend")),
                        age(&s(m, "/creationTime")),
                    ]
                })
                .collect(),
        ),
        ResourceType::Dataplane => (
            vec!["MESH", "NAME", "ADDRESS", "SERVICES", "AGE"],
            items
                .iter()
                .map(|d| {
                    let services: Vec<String> = d
                        .pointer("/networking/inbound")
                        .and_then(Value::as_array)
                        .map(|ib| {
                            ib.iter()
                                .map(|i| {
                                    format!(
                                        "{}:{}",
                                        s(i, "/tags/kuma.io~1service"),
                                        i.get("port").cloned().unwrap_or_default()
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    vec![
                        s(d, "/mesh"),
                        s(d, "/name"),
                        s(d, "/networking/address"),
                        services.join(","),
                        age(&s(d, "/creationTime")),
                    ]
                })
                .collect(),
        ),
        _ => (
            vec!["MESH", "NAME", "VERSION", "AGE"],
            items
                .iter()
                .map(|p| {
                    vec![
                        s(p, "/mesh"),
                        s(p, "/name"),
                        p.get("version").map(|v| v.to_string()).unwrap_or_default(),
                        age(&s(p, "/creationTime")),
                    ]
                })
                .collect(),
        ),
    };
    print!("{}", table::render(&header, &rows));
}

fn age(rfc3339: &str) -> String {
    table::age(rfc3339, std::time::SystemTime::now())
}

/// The `jti` claim of a JWT, read without verifying it (for the user's information only).
fn token_id(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("jti")?.as_str().map(str::to_string)
}
