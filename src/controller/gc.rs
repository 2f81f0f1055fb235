//! The orphan scan, the last safety net: every `--gc-interval` it takes
//! every VM the inventory listed (asking it for a fresh list when its last
//! one is older than the interval; VMs of zones the list could not see are
//! not judged) and compares them with the live TestRuns and PrebuildPresets
//! in the API server (their metadata, listed page by page afresh for each
//! scan, never from a cache that may lag). A VM whose owner is gone and that
//! is older than `--gc-grace` is first marked (label `orphan-found-at`) and
//! deleted on the next scan if still unowned. VMs of other installations
//! are never listed, so never touched; a controller that watches one
//! namespace judges only VMs whose `owner-namespace` label names it (it
//! cannot see any other owner, so it cannot tell whether one is alive).
//! One VM's error never stops the sweep.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, ListParams};

use super::Context;
use crate::api::prebuild::PrebuildPreset;
use crate::api::testrun::TestRun;
use crate::compute::naming::{LABEL_OWNER_NAMESPACE, LABEL_OWNER_UID, label_value, request_id};
use crate::compute::{Compute, Instance};

/// Longest wait for the inventory to list for a scan.
const LIST_WAIT: Duration = Duration::from_secs(120);

/// The label that marks a VM found without an owner: the Unix time it was found.
pub const LABEL_ORPHAN: &str = "orphan-found-at";

/// How the orphan scan runs.
#[derive(Clone, Debug)]
pub struct GcConfig {
    /// Time between scans.
    pub interval: Duration,
    /// VMs younger than this are never taken for orphans (they may be being
    /// created by a reconcile that has not written its status yet).
    pub grace: Duration,
    /// Only report what would be done.
    pub dry_run: bool,
    /// The one namespace whose owners this controller sees; `None`: all.
    pub scope: Option<String>,
}

/// What the scan does with one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcAction {
    /// Unowned and old enough: mark it.
    Mark {
        /// Zone.
        zone: String,
        /// Name.
        name: String,
    },
    /// Marked on an earlier scan and still unowned: delete it.
    Delete {
        /// Zone.
        zone: String,
        /// Name.
        name: String,
        /// When it was found.
        found_at: String,
    },
    /// Marked, but an owner is live again: clear the mark.
    Unmark {
        /// Zone.
        zone: String,
        /// Name.
        name: String,
    },
}

/// Whether a VM's owner is one this controller could see: every VM when it
/// watches all namespaces, else only VMs labelled with its namespace.
pub fn in_scope(vm: &Instance, scope: Option<&str>) -> bool {
    scope.is_none_or(|ns| vm.labels.get(LABEL_OWNER_NAMESPACE).is_some_and(|v| *v == label_value(ns)))
}

/// Decides, for every VM of the installation whose owner this controller
/// could see (`scope`), what the scan does. Pure.
pub fn plan_sweep(
    vms: &[Instance],
    live_uids: &BTreeSet<String>,
    scope: Option<&str>,
    now: Timestamp,
    grace: Duration,
) -> Vec<GcAction> {
    let grace = super::ops::signed(grace);
    let mut actions = Vec::new();
    for vm in vms.iter().filter(|vm| in_scope(vm, scope)) {
        let owned = vm.labels.get(LABEL_OWNER_UID).is_some_and(|uid| live_uids.contains(uid));
        let mark = vm.labels.get(LABEL_ORPHAN);
        let (zone, name) = (vm.zone.clone(), vm.name.clone());
        match (owned, mark) {
            (true, Some(_)) => actions.push(GcAction::Unmark { zone, name }),
            (true, None) => {}
            (false, Some(found_at)) => actions.push(GcAction::Delete { zone, name, found_at: found_at.clone() }),
            (false, None) => {
                // Without a readable creation time a VM counts as new: never
                // delete what cannot be shown to be old.
                let created = vm.creation_timestamp.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
                if created.is_some_and(|c| now.duration_since(c) >= grace) {
                    actions.push(GcAction::Mark { zone, name });
                }
            }
        }
    }
    actions
}

/// Why a scan could not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The inventory could not list the VMs in time.
    #[error("the inventory has no list of the installation's VMs newer than {0:?}")]
    NoFreshList(Duration),
    /// The owners could not be listed.
    #[error("listing TestRuns and PrebuildPresets: {0}")]
    Kube(#[from] kube::Error),
}

/// Objects per page when listing owners.
const OWNER_PAGE: u32 = 500;

/// The uids (as label values) of every object of a kind, from its metadata
/// only, page by page.
async fn uids_of<K>(api: &Api<K>, into: &mut BTreeSet<String>) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().limit(OWNER_PAGE);
    loop {
        let page = api.list_metadata(&params).await?;
        into.extend(page.items.iter().filter_map(|o| o.metadata.uid.as_deref()).map(label_value));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// The uids (as label values) of every live TestRun and PrebuildPreset.
async fn live_uids(runs: &Api<TestRun>, presets: &Api<PrebuildPreset>) -> Result<BTreeSet<String>, kube::Error> {
    let mut uids = BTreeSet::new();
    uids_of(runs, &mut uids).await?;
    uids_of(presets, &mut uids).await?;
    Ok(uids)
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// VMs seen.
    pub seen: usize,
    /// VMs marked as orphans.
    pub marked: usize,
    /// Orphans deleted (or, in a dry run, that would be).
    pub deleted: usize,
    /// VMs whose action failed (retried next scan).
    pub errors: usize,
}

/// One scan.
pub async fn sweep<C: Compute + Clone>(
    ctx: &Context<C>,
    runs: &Api<TestRun>,
    presets: &Api<PrebuildPreset>,
    config: &GcConfig,
) -> Result<SweepReport, SweepError> {
    // The inventory's list, if it is recent enough; otherwise a fresh one.
    if ctx.inventory.last_list_age().is_none_or(|age| age > config.interval) {
        let seq = ctx.inventory.want_fresh_list();
        if !ctx.inventory.wait_list_after(seq, LIST_WAIT).await {
            return Err(SweepError::NoFreshList(LIST_WAIT));
        }
    }
    let live = live_uids(runs, presets).await?;
    let (mut vms, unreachable) = ctx.inventory.listed();
    // What a zone that could not be seen holds is not known now: not judged.
    vms.retain(|vm| !unreachable.contains(&vm.zone) && in_scope(vm, config.scope.as_deref()));
    let now = Timestamp::now();
    let actions = plan_sweep(&vms, &live, config.scope.as_deref(), now, config.grace);
    let by_name: BTreeMap<(String, String), &Instance> =
        vms.iter().map(|v| ((v.zone.clone(), v.name.clone()), v)).collect();
    let mut report = SweepReport { seen: vms.len(), ..SweepReport::default() };
    for action in actions {
        let result = match &action {
            GcAction::Mark { zone, name } => {
                report.marked += 1;
                ctx.metrics.orphans_found.inc();
                let owner =
                    by_name.get(&(zone.clone(), name.clone())).and_then(|v| v.labels.get(LABEL_OWNER_UID)).cloned();
                tracing::warn!(instance = %name, zone = %zone, owner_uid = ?owner, dry_run = config.dry_run, "orphaned VM found: no live TestRun or PrebuildPreset owns it; marking it for deletion on the next scan");
                if config.dry_run {
                    continue;
                }
                relabel(ctx, &by_name, zone, name, Some(now.as_second().to_string())).await
            }
            GcAction::Unmark { zone, name } => {
                tracing::info!(instance = %name, zone = %zone, "VM has a live owner again; clearing its orphan mark");
                if config.dry_run {
                    continue;
                }
                relabel(ctx, &by_name, zone, name, None).await
            }
            GcAction::Delete { zone, name, found_at } => {
                report.deleted += 1;
                tracing::warn!(instance = %name, zone = %zone, found_at = %found_at, dry_run = config.dry_run, "deleting orphaned VM: still unowned since it was marked");
                if config.dry_run {
                    continue;
                }
                let rid = request_id(&format!("gc/{zone}/{name}/{found_at}"), 0);
                match ctx.tracker.compute().delete(zone, name, &rid).await {
                    Ok(_) => {
                        ctx.metrics.orphans_deleted.inc();
                        Ok(())
                    }
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            report.errors += 1;
            tracing::warn!(action = ?action, error = %e, "orphan scan: action failed; retrying on the next scan");
        }
    }
    Ok(report)
}

async fn relabel<C: Compute + Clone>(
    ctx: &Context<C>,
    vms: &BTreeMap<(String, String), &Instance>,
    zone: &str,
    name: &str,
    mark: Option<String>,
) -> Result<(), crate::compute::ComputeError> {
    let Some(vm) = vms.get(&(zone.to_string(), name.to_string())) else { return Ok(()) };
    let mut labels = vm.labels.clone();
    match &mark {
        Some(at) => labels.insert(LABEL_ORPHAN.to_string(), at.clone()),
        None => labels.remove(LABEL_ORPHAN),
    };
    let rid = request_id(&format!("gc-label/{zone}/{name}/{}", vm.label_fingerprint), 0);
    ctx.tracker.compute().set_labels(zone, name, &labels, &vm.label_fingerprint, &rid).await.map(|_| ())
}

/// Runs the orphan scan every `config.interval`.
pub async fn run<C: Compute + Clone>(
    ctx: Arc<Context<C>>,
    runs: Api<TestRun>,
    presets: Api<PrebuildPreset>,
    config: GcConfig,
) {
    loop {
        match sweep(&ctx, &runs, &presets, &config).await {
            Ok(report) => tracing::info!(
                seen = report.seen,
                marked = report.marked,
                deleted = report.deleted,
                errors = report.errors,
                dry_run = config.dry_run,
                "orphan scan done"
            ),
            Err(e) => tracing::warn!(error = %e, "orphan scan could not run; retrying on the next scan"),
        }
        tokio::time::sleep(config.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, owner: &str, age_secs: i64, mark: Option<&str>, now: Timestamp) -> Instance {
        let mut labels = BTreeMap::from([(LABEL_OWNER_UID.to_string(), owner.to_string())]);
        if let Some(m) = mark {
            labels.insert(LABEL_ORPHAN.to_string(), m.to_string());
        }
        Instance {
            name: name.into(),
            zone: "z".into(),
            status: crate::compute::InstanceStatus::Running,
            labels,
            label_fingerprint: String::new(),
            metadata: BTreeMap::new(),
            creation_timestamp: Some((now - jiff::SignedDuration::from_secs(age_secs)).to_string()),
        }
    }

    #[test]
    fn marks_then_deletes_only_old_unowned_vms() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let live = BTreeSet::from(["alive".to_string()]);
        let vms = vec![
            vm("owned", "alive", 3600, None, now),
            vm("young-orphan", "gone", 10, None, now),
            vm("old-orphan", "gone", 600, None, now),
            vm("marked-orphan", "gone", 900, Some("1799999000"), now),
            vm("marked-but-owned", "alive", 900, Some("1799999000"), now),
        ];
        let actions = plan_sweep(&vms, &live, None, now, Duration::from_secs(300));
        assert_eq!(
            actions,
            vec![
                GcAction::Mark { zone: "z".into(), name: "old-orphan".into() },
                GcAction::Delete { zone: "z".into(), name: "marked-orphan".into(), found_at: "1799999000".into() },
                GcAction::Unmark { zone: "z".into(), name: "marked-but-owned".into() },
            ]
        );
    }

    #[test]
    fn a_vm_without_a_creation_time_is_never_taken_for_an_orphan() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let mut v = vm("x", "gone", 9999, None, now);
        v.creation_timestamp = None;
        assert!(plan_sweep(&[v], &BTreeSet::new(), None, now, Duration::ZERO).is_empty());
    }

    #[test]
    fn a_controller_of_one_namespace_judges_only_vms_of_that_namespace() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let in_ns = |name: &str, ns: Option<&str>| {
            let mut v = vm(name, "not-mine-to-see", 3600, None, now);
            if let Some(ns) = ns {
                v.labels.insert(LABEL_OWNER_NAMESPACE.to_string(), ns.to_string());
            }
            v
        };
        let vms = vec![in_ns("mine", Some("team-a")), in_ns("neighbour", Some("team-b")), in_ns("unlabelled", None)];
        let scoped = plan_sweep(&vms, &BTreeSet::new(), Some("team-a"), now, Duration::from_secs(300));
        assert_eq!(scoped, vec![GcAction::Mark { zone: "z".into(), name: "mine".into() }]);
        // Watching every namespace, every owner is visible: all are judged.
        assert_eq!(plan_sweep(&vms, &BTreeSet::new(), None, now, Duration::from_secs(300)).len(), 3);
    }
}
