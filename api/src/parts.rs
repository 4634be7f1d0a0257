//! The parts of a snapshot, and how a proxy completes a snapshot that keeps some.
//!
//! The control plane leaves out of a push the parts that did not change since its previous
//! push on the stream (listing them in `Snapshot.kept`); the proxy takes them from the
//! snapshot it applied last, after checking that its versions of them are the ones the new
//! snapshot names. [`merge`] does that for any [`Parted`] message: the proxy's
//! [`Snapshot`], and leaner decodings of the same bytes (the benchmark's simulated proxies
//! leave the outbound services undecoded).
//!
//! ```
//! use weft_api::parts::{self, ALL};
//! use weft_api::proto::{Snapshot, SnapshotPart, SnapshotParts};
//!
//! let parts = SnapshotParts { mesh: "m1".into(), ..Default::default() };
//! let applied = Snapshot {
//!     trust_bundle_pem: "PEM".into(),
//!     parts: Some(parts.clone()),
//!     ..Default::default()
//! };
//! let mut next = Snapshot {
//!     version: "v2".into(),
//!     parts: Some(parts),
//!     kept: vec![SnapshotPart::Mesh as i32],
//!     ..Default::default()
//! };
//! parts::merge(&mut next, Some(&applied)).unwrap();
//! assert_eq!(next.trust_bundle_pem, "PEM");
//! assert!(next.kept.is_empty());
//! assert_eq!(ALL.len(), 5);
//! ```

use crate::proto::{Snapshot, SnapshotPart, SnapshotParts};

/// Every part, in the order of their fields in `Snapshot`.
pub const ALL: [SnapshotPart; 5] = [
    SnapshotPart::Dataplane,
    SnapshotPart::Mesh,
    SnapshotPart::Inbounds,
    SnapshotPart::Outbounds,
    SnapshotPart::OutboundListeners,
];

impl SnapshotParts {
    /// The version of `part` (empty for an unknown part or one without a version).
    pub fn get(&self, part: SnapshotPart) -> &str {
        match part {
            SnapshotPart::Unspecified => "",
            SnapshotPart::Dataplane => &self.dataplane,
            SnapshotPart::Mesh => &self.mesh,
            SnapshotPart::Inbounds => &self.inbounds,
            SnapshotPart::Outbounds => &self.outbounds,
            SnapshotPart::OutboundListeners => &self.outbound_listeners,
        }
    }
}

/// A snapshot message whose parts can be kept from an earlier one.
pub trait Parted {
    /// The version of each part.
    fn parts(&self) -> Option<&SnapshotParts>;
    /// The parts left out of this message (`SnapshotPart` values).
    fn kept(&self) -> &[i32];
    /// Forgets which parts were left out (once they are filled in).
    fn clear_kept(&mut self);
    /// Sets `part`'s fields to `from`'s.
    fn keep(&mut self, part: SnapshotPart, from: &Self);
}

impl Parted for Snapshot {
    fn parts(&self) -> Option<&SnapshotParts> {
        self.parts.as_ref()
    }

    fn kept(&self) -> &[i32] {
        &self.kept
    }

    fn clear_kept(&mut self) {
        self.kept.clear();
    }

    fn keep(&mut self, part: SnapshotPart, from: &Snapshot) {
        match part {
            SnapshotPart::Unspecified => {}
            SnapshotPart::Dataplane => self.dataplane.clone_from(&from.dataplane),
            SnapshotPart::Mesh => {
                self.mesh.clone_from(&from.mesh);
                self.trust_bundle_pem.clone_from(&from.trust_bundle_pem);
            }
            SnapshotPart::Inbounds => self.inbounds.clone_from(&from.inbounds),
            SnapshotPart::Outbounds => self.outbounds.clone_from(&from.outbounds),
            SnapshotPart::OutboundListeners => {
                self.outbound_listeners.clone_from(&from.outbound_listeners);
            }
        }
    }
}

/// Completes `next` with the parts it keeps from `applied`, the snapshot applied last;
/// afterwards `next` is the complete snapshot its version names, with `kept` empty.
///
/// An error (the NACK reason) when `next` keeps a part that `applied` does not have at the
/// version `next` names, or a part this build does not know; `next` is then unchanged.
pub fn merge<S: Parted>(next: &mut S, applied: Option<&S>) -> Result<(), String> {
    if next.kept().is_empty() {
        return Ok(());
    }
    let applied = applied.ok_or("the snapshot keeps parts, but none was applied before")?;
    let want = next
        .parts()
        .ok_or("the snapshot keeps parts but has no part versions")?;
    let have = applied.parts();
    let mut kept = Vec::with_capacity(next.kept().len());
    for &raw in next.kept() {
        let part = SnapshotPart::try_from(raw)
            .ok()
            .filter(|p| *p != SnapshotPart::Unspecified)
            .ok_or_else(|| format!("the snapshot keeps part {raw}, unknown to this proxy"))?;
        let (want, have) = (want.get(part), have.map_or("", |h| h.get(part)));
        if want.is_empty() || want != have {
            return Err(format!(
                "the snapshot keeps {} at version {want:?}, but the applied one has {have:?}",
                part.as_str_name()
            ));
        }
        kept.push(part);
    }
    for part in kept {
        next.keep(part, applied);
    }
    next.clear_kept();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DataplaneIdentity, OutboundService};

    fn versions(tag: &str) -> SnapshotParts {
        SnapshotParts {
            dataplane: format!("d{tag}"),
            mesh: format!("m{tag}"),
            inbounds: format!("i{tag}"),
            outbounds: format!("o{tag}"),
            outbound_listeners: format!("l{tag}"),
        }
    }

    fn applied() -> Snapshot {
        Snapshot {
            version: "v1".into(),
            dataplane: Some(DataplaneIdentity {
                name: "web-1".into(),
                ..Default::default()
            }),
            trust_bundle_pem: "PEM".into(),
            outbounds: vec![OutboundService {
                service: "backend".into(),
                ..Default::default()
            }],
            parts: Some(versions("1")),
            ..Default::default()
        }
    }

    #[test]
    fn kept_parts_come_from_the_applied_snapshot() {
        let full = applied();
        let mut next = Snapshot {
            version: "v2".into(),
            parts: Some(SnapshotParts {
                inbounds: "i2".into(),
                ..versions("1")
            }),
            kept: ALL
                .iter()
                .filter(|p| **p != SnapshotPart::Inbounds)
                .map(|p| *p as i32)
                .collect(),
            ..Default::default()
        };
        merge(&mut next, Some(&full)).unwrap();
        assert_eq!(
            next,
            Snapshot {
                version: "v2".into(),
                parts: next.parts.clone(),
                ..full
            }
        );
    }

    #[test]
    fn a_complete_snapshot_needs_nothing_applied() {
        let mut next = applied();
        merge(&mut next, None).unwrap();
        assert_eq!(next, applied());
    }

    #[test]
    fn a_part_at_another_version_is_refused() {
        let mut next = Snapshot {
            parts: Some(SnapshotParts {
                outbounds: "o2".into(),
                ..versions("1")
            }),
            kept: vec![SnapshotPart::Outbounds as i32],
            ..Default::default()
        };
        let before = next.clone();
        let err = merge(&mut next, Some(&applied())).unwrap_err();
        assert!(err.contains("SNAPSHOT_PART_OUTBOUNDS"), "{err}");
        assert_eq!(next, before, "unchanged");
        assert!(merge(&mut next, None).is_err(), "nothing applied");
        next.kept = vec![42];
        let err = merge(&mut next, Some(&applied())).unwrap_err();
        assert!(err.contains("42"), "{err}");
    }
}
