//! Reading resource documents: YAML or JSON, one or many (`---`), in Kuma's universal form
//! (`type`, `name`, `mesh`, fields) or its Kubernetes form (`apiVersion`, `kind`,
//! `metadata`, `spec`). Every document is parsed into typed structs that reject unknown
//! fields, then validated; an error names the document, the line and the field.

use crate::resources::{Resource, ResourceType, Spec, join_path};
use crate::validate::validate;
use crate::yaml_lines::{self, DocLines};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// The API version of Kuma's Kubernetes resources.
pub const KUBERNETES_API_VERSION: &str = "kuma.io/v1alpha1";

/// A document that could not be parsed or failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// 1-based index of the document in the input.
    pub document: usize,
    /// 1-based line in the input, when known.
    pub line: Option<usize>,
    /// The offending field's path within the document (`networking.inbound[0].port`).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// `Type/name` of the document when it got that far.
    pub resource: Option<String>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(r) = &self.resource {
            write!(f, " ({r})")?;
        }
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Which of Kuma's two spellings a document used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `type`, `name`, `mesh` and the fields at the top level.
    Universal,
    /// `apiVersion`, `kind`, `metadata`, `spec`.
    Kubernetes,
}

/// One parsed and validated document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The resource.
    pub resource: Resource,
    /// The `version` the writer last read, for optimistic concurrency; `None` = unconditional.
    pub version: Option<u64>,
    /// The spelling the document used.
    pub form: Form,
}

/// Keys of the universal form that are metadata, not body.
const UNIVERSAL_META: [&str; 7] = [
    "type",
    "name",
    "mesh",
    "labels",
    "creationTime",
    "modificationTime",
    "version",
];

/// Parses every document of `text` (YAML or JSON).
///
/// ```
/// let docs = weft_api::parse::parse_documents("type: Mesh\nname: payments\n").unwrap();
/// assert_eq!(docs[0].resource.name, "payments");
/// let err = weft_api::parse::parse_documents("type: Mesh\nname: p\nmtls:\n  enabledBackend: ca-1\n  tpye: x\n").unwrap_err();
/// assert_eq!(err.line, Some(5));
/// assert_eq!(err.field.as_deref(), Some("mtls.tpye"));
/// ```
pub fn parse_documents(text: &str) -> Result<Vec<Document>, ParseError> {
    let lines = yaml_lines::index(text).map_err(|e| ParseError {
        document: 1,
        line: Some(e.line).filter(|l| *l > 0),
        field: None,
        message: format!("invalid YAML: {}", e.message),
        resource: None,
    })?;
    let values: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        let line = e.location().map(|l| l.line() as usize);
        let document = line
            .map(|l| {
                lines
                    .iter()
                    .take_while(|d| d.start_line <= l)
                    .count()
                    .max(1)
            })
            .unwrap_or(1);
        ParseError {
            document,
            line,
            field: None,
            message: format!("invalid YAML: {}", e.without_snippet()),
            resource: None,
        }
    })?;
    let empty = DocLines::default();
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            parse_document(v, lines.get(i).unwrap_or(&empty), true).map_err(|e| ParseError {
                document: i + 1,
                ..e
            })
        })
        .collect()
}

/// Parses one stored document already read into a JSON value (line numbers unknown). It is
/// held to [`validate`]'s rules, not to the ones only new writes must meet
/// ([`crate::validate::admit`]), which [`parse_documents`] applies: what an older weft stored
/// reads back as it was.
pub fn parse_value(value: Value) -> Result<Document, ParseError> {
    parse_document(value, &DocLines::default(), false)
}

fn parse_document(value: Value, lines: &DocLines, admit: bool) -> Result<Document, ParseError> {
    let err = |field: &str, message: String| ParseError {
        document: 1,
        line: Some(lines.line_of(field)).filter(|l| *l > 0),
        field: Some(field.to_string()).filter(|f| !f.is_empty()),
        message,
        resource: None,
    };
    let Value::Object(top) = value else {
        return Err(err(
            "",
            "expected a mapping with `type` (universal form) or `kind` (Kubernetes form)".into(),
        ));
    };
    let label = document_label(&top);
    if top.contains_key("kind") || top.contains_key("apiVersion") {
        parse_kubernetes(top, &err)
    } else {
        parse_universal(top, &err)
    }
    .and_then(|doc| {
        validate(&doc.resource)
            .and_then(|()| {
                if admit {
                    crate::validate::admit(&doc.resource)
                } else {
                    Ok(())
                }
            })
            .map_err(|e| {
                let field = match doc.form {
                    Form::Universal => e.path.clone(),
                    Form::Kubernetes => kubernetes_path(doc.resource.resource_type(), &e.path),
                };
                err(&field, e.message)
            })?;
        Ok(doc)
    })
    .map_err(|e| ParseError {
        resource: label,
        ..e
    })
}

/// `Type/name` of a raw document, as far as it can be read, for error messages.
fn document_label(top: &Map<String, Value>) -> Option<String> {
    let ty = top.get("type").or_else(|| top.get("kind"))?.as_str()?;
    let name = top
        .get("name")
        .or_else(|| top.get("metadata").and_then(|m| m.get("name")))
        .and_then(Value::as_str)
        .unwrap_or("?");
    Some(format!("{ty}/{name}"))
}

/// Where a universal-form path sits in the Kubernetes form.
fn kubernetes_path(ty: ResourceType, path: &str) -> String {
    match path {
        "name" => "metadata.name".into(),
        "mesh" => "mesh".into(),
        p if p.starts_with("labels") => format!("metadata.{p}"),
        p if ty.has_spec_envelope() => p.to_string(),
        p => join_path("spec", p),
    }
}

fn take_string(
    m: &mut Map<String, Value>,
    key: &str,
    prefix: &str,
    err: &dyn Fn(&str, String) -> ParseError,
) -> Result<Option<String>, ParseError> {
    match m.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(err(
            &join_path(prefix, key),
            format!("expected a string, found {}", kind_of(&other)),
        )),
    }
}

fn take_labels(
    m: &mut Map<String, Value>,
    key: &str,
    prefix: &str,
    err: &dyn Fn(&str, String) -> ParseError,
) -> Result<BTreeMap<String, String>, ParseError> {
    match m.remove(key) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            err(
                &join_path(prefix, key),
                format!("expected a map of strings: {e}"),
            )
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

fn resource_type_of(
    name: Option<String>,
    field: &str,
    err: &dyn Fn(&str, String) -> ParseError,
) -> Result<ResourceType, ParseError> {
    let name = name.ok_or_else(|| err(field, format!("missing field `{field}`")))?;
    ResourceType::from_name(&name).ok_or_else(|| {
        let known: Vec<&str> = ResourceType::ALL.iter().map(|t| t.name()).collect();
        err(
            field,
            format!(
                "unknown resource type `{name}`, expected one of {}",
                known.join(", ")
            ),
        )
    })
}

fn parse_universal(
    mut top: Map<String, Value>,
    err: &dyn Fn(&str, String) -> ParseError,
) -> Result<Document, ParseError> {
    let ty = resource_type_of(take_string(&mut top, "type", "", err)?, "type", err)?;
    let name = take_string(&mut top, "name", "", err)?
        .ok_or_else(|| err("name", "missing field `name`".into()))?;
    let mesh = take_string(&mut top, "mesh", "", err)?;
    let labels = take_labels(&mut top, "labels", "", err)?;
    let version = match top.remove("version") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| err("version", "expected a non-negative integer".into()))?,
        ),
    };
    top.remove("creationTime");
    top.remove("modificationTime");
    let mesh = match (ty.is_mesh_scoped(), mesh) {
        (true, None) => {
            return Err(err(
                "mesh",
                format!("missing field `mesh`: a {ty} belongs to a mesh"),
            ));
        }
        (false, Some(_)) => {
            return Err(err(
                "mesh",
                "a Mesh does not belong to a mesh; remove `mesh`".into(),
            ));
        }
        (_, m) => m,
    };
    let spec = Spec::from_body(ty, Value::Object(top)).map_err(|(path, msg)| {
        let msg = if msg.starts_with("unknown field")
            && path.split('.').count() == 1
            && !ty.has_spec_envelope()
        {
            format!("{msg} (or one of {})", UNIVERSAL_META.join(", "))
        } else {
            msg
        };
        err(&path, msg)
    })?;
    Ok(Document {
        resource: Resource {
            name,
            mesh,
            labels,
            spec,
        },
        version,
        form: Form::Universal,
    })
}

fn parse_kubernetes(
    mut top: Map<String, Value>,
    err: &dyn Fn(&str, String) -> ParseError,
) -> Result<Document, ParseError> {
    match take_string(&mut top, "apiVersion", "", err)? {
        Some(v) if v == KUBERNETES_API_VERSION => {}
        Some(v) => {
            return Err(err(
                "apiVersion",
                format!("unsupported apiVersion `{v}`, expected `{KUBERNETES_API_VERSION}`"),
            ));
        }
        None => return Err(err("apiVersion", "missing field `apiVersion`".into())),
    }
    let ty = resource_type_of(take_string(&mut top, "kind", "", err)?, "kind", err)?;
    let mut metadata = match top.remove("metadata") {
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(err(
                "metadata",
                format!("expected a mapping, found {}", kind_of(&other)),
            ));
        }
        None => return Err(err("metadata", "missing field `metadata`".into())),
    };
    let name = take_string(&mut metadata, "name", "metadata", err)?
        .ok_or_else(|| err("metadata.name", "missing field `metadata.name`".into()))?;
    let mut labels = take_labels(&mut metadata, "labels", "metadata", err)?;
    let annotations = take_labels(&mut metadata, "annotations", "metadata", err)?;
    // Kubernetes bookkeeping a user may paste from `kubectl get -o yaml`; it means nothing here.
    for k in [
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
    ] {
        metadata.remove(k);
    }
    if let Some(k) = metadata.keys().next() {
        return Err(err(
            &format!("metadata.{k}"),
            format!("unknown field `{k}`, expected one of name, namespace, labels, annotations"),
        ));
    }
    let mut spec = match top.remove("spec") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(other) => {
            return Err(err(
                "spec",
                format!("expected a mapping, found {}", kind_of(&other)),
            ));
        }
    };
    let top_mesh = take_string(&mut top, "mesh", "", err)?;
    let spec_mesh = if ty.is_mesh_scoped() {
        take_string(&mut spec, "mesh", "spec", err)?
    } else {
        None
    };
    if let Some(k) = top.keys().next() {
        return Err(err(
            k,
            format!("unknown field `{k}`, expected one of apiVersion, kind, metadata, spec, mesh"),
        ));
    }
    let label_mesh = labels.remove("kuma.io/mesh");
    let mesh = if ty.is_mesh_scoped() {
        Some(
            top_mesh
                .or(spec_mesh)
                .or_else(|| annotations.get("kuma.io/mesh").cloned())
                .or(label_mesh)
                .unwrap_or_else(|| "default".to_string()),
        )
    } else if top_mesh.is_some() {
        return Err(err(
            "mesh",
            "a Mesh does not belong to a mesh; remove `mesh`".into(),
        ));
    } else {
        None
    };
    let body = if ty.has_spec_envelope() {
        let mut m = Map::new();
        m.insert("spec".into(), Value::Object(spec));
        Value::Object(m)
    } else {
        Value::Object(spec)
    };
    let spec =
        Spec::from_body(ty, body).map_err(|(path, msg)| err(&kubernetes_path(ty, &path), msg))?;
    Ok(Document {
        resource: Resource {
            name,
            mesh,
            labels,
            spec,
        },
        version: None,
        form: Form::Kubernetes,
    })
}
