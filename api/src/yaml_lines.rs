//! Maps field paths (`mtls.backends[0].name`) to the YAML line they were written on, so an
//! error about a field can point the user at the line. Built from the parser's events; aliases
//! are not expanded, so a hostile document costs no more than its own size.

use serde_saphyr::granit_parser::{Event, Parser};
use std::collections::HashMap;

/// Line numbers of one document's fields.
#[derive(Debug, Default)]
pub(crate) struct DocLines {
    /// 1-based line where the document starts.
    pub start_line: usize,
    /// Path → 1-based line of the key (or sequence item).
    pub fields: HashMap<String, usize>,
}

impl DocLines {
    /// The line of `path` or of its closest recorded ancestor.
    pub fn line_of(&self, path: &str) -> usize {
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.fields.get(&p) {
                return *l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return self.start_line,
            }
        }
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

/// A syntax error with its 1-based line.
pub(crate) struct SyntaxError {
    pub line: usize,
    pub message: String,
}

const MAX_EVENTS: usize = 1_000_000;

/// The most bytes of field paths one call may record. Each recorded path repeats its parent's,
/// so a document of deep, long keys over many items would otherwise cost its depth times its
/// item count (a 2 MB document, gigabytes); real resources stay far below this.
const MAX_PATH_BYTES: usize = 64 << 20;

/// Indexes every non-empty document of `text`.
pub(crate) fn index(text: &str) -> Result<Vec<DocLines>, SyntaxError> {
    let mut docs = Vec::new();
    let mut current: Option<DocLines> = None;
    let mut stack: Vec<Frame> = Vec::new();
    let mut root_is_empty = false;
    let mut path_bytes = 0usize;
    for (n, item) in Parser::new_from_str(text).enumerate() {
        if path_bytes > MAX_PATH_BYTES {
            return Err(SyntaxError {
                line: 0,
                message: "document too large (its field paths are too deep and too many)".into(),
            });
        }
        if n > MAX_EVENTS {
            return Err(SyntaxError {
                line: 0,
                message: "document too large".into(),
            });
        }
        let (event, span) = item.map_err(|e| SyntaxError {
            line: e.marker().line(),
            message: e.info().to_string(),
        })?;
        let line = span.start.line();
        match event {
            Event::DocumentStart(..) => {
                current = Some(DocLines {
                    start_line: line,
                    fields: HashMap::new(),
                });
                stack.clear();
                root_is_empty = false;
            }
            Event::DocumentEnd => {
                if let Some(doc) = current.take()
                    && !root_is_empty
                {
                    docs.push(doc);
                }
            }
            Event::Scalar(value, style, ..) => {
                if stack.is_empty() {
                    let plain_null = matches!(value.as_ref(), "" | "~" | "null" | "Null" | "NULL");
                    root_is_empty = plain_null && format!("{style:?}") == "Plain";
                    continue;
                }
                if let Some(doc) = current.as_mut() {
                    path_bytes +=
                        on_value(&mut stack, doc, line, Some(value.as_ref()), false).len();
                }
            }
            Event::Alias(..) => {
                if let Some(doc) = current.as_mut() {
                    path_bytes += on_value(&mut stack, doc, line, None, false).len();
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(event, Event::MappingStart(..));
                let path = match current.as_mut() {
                    Some(doc) => on_value(&mut stack, doc, line, None, true),
                    None => String::new(),
                };
                // The frame keeps a copy of it.
                path_bytes += 2 * path.len();
                stack.push(if is_map {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                // The finished collection was the value of its parent's key.
                if let Some(Frame::Map { key, .. }) = stack.last_mut() {
                    *key = None;
                }
            }
            _ => {}
        }
    }
    Ok(docs)
}

/// Records a node at the current position and returns its path. In key position `scalar`
/// is the key's text; `is_collection` says the node is a mapping or sequence that ends later.
fn on_value(
    stack: &mut [Frame],
    doc: &mut DocLines,
    line: usize,
    scalar: Option<&str>,
    is_collection: bool,
) -> String {
    match stack.last_mut() {
        None => String::new(),
        Some(Frame::Seq { path, next }) => {
            let p = format!("{path}[{next}]");
            *next += 1;
            doc.fields.entry(p.clone()).or_insert(line);
            p
        }
        Some(Frame::Map { path, key }) => match key.take() {
            None => {
                // Key position: a scalar key names the field; a complex key gets a placeholder.
                let k = scalar.unwrap_or("?").to_string();
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                doc.fields.entry(p.clone()).or_insert(line);
                *key = Some(k);
                p
            }
            Some(k) => {
                let p = if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                };
                // A scalar value completes the entry; a collection value is completed on its end.
                if is_collection {
                    *key = Some(String::new());
                }
                p
            }
        },
    }
}
