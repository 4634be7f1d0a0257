//! Which policies select a proxy, and the ordered permission rules of its inbounds.

use super::super::view::MeshView;
use weft_api::dataplane::SERVICE_TAG;
use weft_api::policy::{Action, Selector, Tags, TargetKind, TargetRef};
use weft_api::proto::{self as pb, permission_rule};

/// How specific a targetRef kind is; more specific policies and entries win.
pub(super) fn specificity(kind: TargetKind) -> u8 {
    match kind {
        TargetKind::Mesh => 0,
        TargetKind::MeshSubset => 1,
        TargetKind::MeshService => 2,
        TargetKind::MeshServiceSubset => 3,
        TargetKind::Dataplane => 4,
        TargetKind::MeshHttpRoute => 5,
    }
}

fn tags_subset(want: &Tags, have: &Tags) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Whether a top-level targetRef selects a proxy (named `dp_name`) through these inbound tags.
pub(super) fn target_selects(t: &TargetRef, dp_name: &str, tags: &Tags) -> bool {
    let service = tags.get(SERVICE_TAG).map(String::as_str);
    match t.kind {
        TargetKind::Mesh => true,
        TargetKind::MeshSubset => tags_subset(&t.tags, tags),
        TargetKind::MeshService => t.name.as_deref() == service,
        TargetKind::MeshServiceSubset => t.name.as_deref() == service && tags_subset(&t.tags, tags),
        TargetKind::Dataplane => t.name.as_deref() == Some(dp_name),
        TargetKind::MeshHttpRoute => false,
    }
}

/// The source service a `from` targetRef names: `*` for the whole mesh, `None` when it selects
/// by tags other than the service (a source's identity carries only its service).
fn source_of(t: &TargetRef) -> Option<String> {
    match t.kind {
        TargetKind::Mesh => Some("*".into()),
        TargetKind::MeshService => t.name.clone(),
        TargetKind::MeshSubset | TargetKind::MeshServiceSubset => {
            let service = t.name.clone().or_else(|| t.tags.get(SERVICE_TAG).cloned());
            let only_service = t.tags.keys().all(|k| k == SERVICE_TAG);
            if only_service {
                service.or(Some("*".into()))
            } else {
                None
            }
        }
        TargetKind::Dataplane | TargetKind::MeshHttpRoute => None,
    }
}

/// The ordered permission rules of one inbound: MeshTrafficPermission entries, most specific
/// first (by the `from` entry, then the policy's own targetRef), then legacy TrafficPermission
/// allows. The proxy applies the first rule whose source matches.
pub(super) fn permissions(dp_name: &str, tags: &Tags, view: &MeshView) -> Vec<pb::PermissionRule> {
    let mut ranked: Vec<((u8, u8, String, usize), pb::PermissionRule)> = Vec::new();
    for (policy, mtp) in &view.mesh_traffic_permissions {
        if !target_selects(&mtp.target_ref, dp_name, tags) {
            continue;
        }
        for (i, from) in mtp.from.iter().enumerate() {
            let Some(source) = source_of(&from.target_ref) else {
                continue;
            };
            let action = match from.default.action {
                Action::Allow => permission_rule::Action::Allow,
                Action::Deny => permission_rule::Action::Deny,
                Action::AllowWithShadowDeny => permission_rule::Action::AllowWithShadowDeny,
            };
            let rule = pb::PermissionRule {
                source_service: source,
                action: action as i32,
                origin: format!("MeshTrafficPermission/{policy}"),
            };
            // Sort descending by specificity: store the complement.
            let key = (
                u8::MAX - specificity(from.target_ref.kind),
                u8::MAX - specificity(mtp.target_ref.kind),
                policy.clone(),
                i,
            );
            ranked.push((key, rule));
        }
    }
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rules: Vec<pb::PermissionRule> = ranked.into_iter().map(|(_, r)| r).collect();
    // Kuma applies one TrafficPermission per inbound: the one whose destination selector
    // that matches the inbound is the most specific (exact tags, then `*` tags); of equally
    // specific ones, the newest, then the first by name (Kuma's `SelectInboundConnectionPolicy`).
    // Its sources are the inbound's allows, so a narrower permission for a service replaces
    // a mesh-wide allow-all for it rather than adding to it.
    let created = |name: &String| view.traffic_permissions_created.get(name);
    let chosen = view
        .traffic_permissions
        .iter()
        .filter_map(|(name, tp)| {
            let rank = tp
                .destinations
                .iter()
                .filter(|d| d.matches(tags))
                .map(selector_rank)
                .max()?;
            Some((rank, name, tp))
        })
        .max_by(|(ra, na, _), (rb, nb, _)| {
            ra.cmp(rb)
                .then_with(|| created(na).cmp(&created(nb)))
                .then_with(|| nb.cmp(na))
        });
    if let Some((_, policy, tp)) = chosen {
        for src in &tp.sources {
            let Some(service) = src.tags.get(SERVICE_TAG) else {
                continue;
            };
            if src.tags.iter().any(|(k, v)| k != SERVICE_TAG && v != "*") {
                // Sources are identified by service only; a tag-narrowed selector cannot match.
                continue;
            }
            rules.push(pb::PermissionRule {
                source_service: service.clone(),
                action: permission_rule::Action::Allow as i32,
                origin: format!("TrafficPermission/{policy}"),
            });
        }
    }
    rules
}

/// How specific a legacy tag selector is: its exact tags, then its `*` tags.
fn selector_rank(selector: &Selector) -> (usize, usize) {
    let wildcards = selector.tags.values().filter(|v| *v == "*").count();
    (selector.tags.len() - wildcards, wildcards)
}
