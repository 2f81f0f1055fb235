//! The inventory's book-keeping, as plain data: which VMs of the
//! installation exist, as far as the last list and the controller's own
//! calls tell, and where that knowledge has holes.
//!
//! Every list and every local update takes a number from one sequence, so
//! "this list started after that delete finished" is a comparison, not a
//! guess about clocks. The rules:
//! - A list replaces what it covers, except entries updated locally after
//!   the list started (a VM deleted meanwhile stays gone) and *expected*
//!   VMs: a list may not show a VM whose insert is still running, so an
//!   expected VM ends only when its insert does (created, or not).
//! - A zone the list could not see keeps its entries as they were, and is
//!   *unknown*: nothing in it is ever reported absent.
//! - Before the first list, everything is unknown.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::compute::naming::LABEL_OWNER_UID;
use crate::compute::{Instance, InstanceStatus, Listing};

/// A VM's place: (zone, name).
pub type VmKey = (String, String);

/// How the inventory came to know a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Its insert was accepted; no list has shown it yet.
    Expected,
    /// A list showed it (or its insert finished).
    Listed,
}

/// One VM the inventory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The VM as last seen (or as requested, when expected).
    pub instance: Instance,
    /// How it is known.
    pub origin: Origin,
    /// Sequence number of the last change.
    pub updated: u64,
    /// For an expected VM: the start of the last list that covered its
    /// zone and did not show it (its insert may still be running, or have
    /// failed).
    pub missed: Option<u64>,
}

/// What the inventory can say about one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence<'a> {
    /// It exists (or its insert was accepted).
    Present(&'a Entry),
    /// A complete list that covered its zone did not show it, and nothing
    /// local says otherwise.
    Absent,
    /// The inventory cannot tell: never synced, or its zone was unreachable.
    Unknown,
}

/// The owners whose VMs changed in an update, by owner uid label value.
pub type Changed = BTreeSet<String>;

/// The inventory's state.
#[derive(Debug, Default)]
pub struct InventoryState {
    seq: u64,
    entries: BTreeMap<VmKey, Entry>,
    /// VMs deleted locally, with when: a list that started before then must
    /// not bring them back.
    tombstones: BTreeMap<VmKey, u64>,
    by_owner: HashMap<String, BTreeSet<VmKey>>,
    /// Start of the last list applied.
    listed_at: Option<u64>,
    /// Zones the last list could not see.
    unreachable: BTreeSet<String>,
}

fn owner_of(instance: &Instance) -> Option<&String> {
    instance.labels.get(LABEL_OWNER_UID)
}

impl InventoryState {
    /// The current sequence number; anything that happens later gets a larger one.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Whether a list was ever applied.
    pub fn synced(&self) -> bool {
        self.listed_at.is_some()
    }

    /// The start of the last list applied.
    pub fn listed_at(&self) -> Option<u64> {
        self.listed_at
    }

    /// Zones the last list could not see.
    pub fn unreachable(&self) -> &BTreeSet<String> {
        &self.unreachable
    }

    /// Whether the zone's absence facts can be trusted as of the last list.
    pub fn zone_known(&self, zone: &str) -> bool {
        self.synced() && !self.unreachable.contains(zone)
    }

    /// Number of VMs held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no VM is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert_entry(&mut self, key: VmKey, mut entry: Entry) {
        // Planners never read a VM's metadata (its startup script and
        // tokens are the bulk of a VM's size): not kept.
        entry.instance.metadata = BTreeMap::new();
        if let Some(old) = self.entries.get(&key)
            && let Some(owner) = owner_of(&old.instance)
            && Some(owner) != owner_of(&entry.instance)
        {
            let owner = owner.clone();
            self.unindex(&owner, &key);
        }
        if let Some(owner) = owner_of(&entry.instance) {
            self.by_owner.entry(owner.clone()).or_default().insert(key.clone());
        }
        self.entries.insert(key, entry);
    }

    fn unindex(&mut self, owner: &str, key: &VmKey) {
        if let Some(keys) = self.by_owner.get_mut(owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_owner.remove(owner);
            }
        }
    }

    fn remove_entry(&mut self, key: &VmKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        if let Some(owner) = owner_of(&entry.instance).cloned() {
            self.unindex(&owner, key);
        }
        Some(entry)
    }

    /// A list is about to start: returns its sequence number.
    pub fn begin_list(&mut self) -> u64 {
        self.next()
    }

    /// Applies a list that started at `started`. Returns the owners whose
    /// VMs appeared, vanished or stopped.
    pub fn apply_list(&mut self, started: u64, listing: Listing) -> Changed {
        let mut changed = Changed::new();
        // A list older than the one applied last tells nothing new.
        if self.listed_at.is_some_and(|at| at > started) {
            return changed;
        }
        let seen: BTreeMap<VmKey, Instance> =
            listing.instances.into_iter().map(|i| ((i.zone.clone(), i.name.clone()), i)).collect();
        // Missing: held before, in a zone the list saw, not in the list, and
        // not touched locally since the list started. A listed VM is gone;
        // an expected one is only noted as missed (its insert may still run).
        let mut vanished: Vec<VmKey> = Vec::new();
        for (key, entry) in self.entries.iter_mut() {
            if seen.contains_key(key) || listing.unreachable.contains(&key.0) || entry.updated >= started {
                continue;
            }
            match entry.origin {
                Origin::Listed => vanished.push(key.clone()),
                Origin::Expected => entry.missed = Some(started),
            }
        }
        for key in vanished {
            if let Some(entry) = self.remove_entry(&key)
                && let Some(owner) = owner_of(&entry.instance)
            {
                changed.insert(owner.clone());
            }
        }
        for (key, instance) in seen {
            if self.tombstones.get(&key).is_some_and(|at| *at > started) {
                continue;
            }
            match self.entries.get(&key) {
                Some(old) if old.updated > started && old.origin == Origin::Expected => {
                    // Accepted after the list started: the list may show an
                    // earlier VM of that name; the local fact is newer.
                    continue;
                }
                Some(old) => {
                    let stopped =
                        |s: &InstanceStatus| matches!(s, InstanceStatus::Stopping | InstanceStatus::Terminated);
                    if owner_of(&old.instance) != owner_of(&instance)
                        || (stopped(&instance.status) && !stopped(&old.instance.status))
                    {
                        changed.extend(owner_of(&old.instance).cloned());
                        changed.extend(owner_of(&instance).cloned());
                    }
                }
                None => changed.extend(owner_of(&instance).cloned()),
            }
            let updated = self.entries.get(&key).map_or(started, |e| e.updated.max(started));
            self.insert_entry(key, Entry { instance, origin: Origin::Listed, updated, missed: None });
        }
        self.tombstones.retain(|_, at| *at > started);
        self.listed_at = Some(started);
        self.unreachable = listing.unreachable;
        changed
    }

    /// An insert was accepted: the VM is expected.
    pub fn expect(&mut self, instance: Instance) {
        let key = (instance.zone.clone(), instance.name.clone());
        let updated = self.next();
        self.tombstones.remove(&key);
        if self.entries.get(&key).is_some_and(|e| e.origin == Origin::Listed) {
            // Already listed (a repeated call of an insert that went through).
            if let Some(e) = self.entries.get_mut(&key) {
                e.updated = updated;
            }
            return;
        }
        self.insert_entry(key, Entry { instance, origin: Origin::Expected, updated, missed: None });
    }

    /// An insert finished: the VM exists (as `requested`, if the inventory
    /// holds no entry for it; after a restart nothing was requested here,
    /// and the next list shows it).
    pub fn created(&mut self, zone: &str, name: &str, requested: Option<Instance>) {
        let key = (zone.to_string(), name.to_string());
        let updated = self.next();
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.origin = Origin::Listed;
            entry.updated = updated;
            entry.missed = None;
        } else if let Some(instance) = requested
            && !self.tombstones.contains_key(&key)
        {
            self.insert_entry(key, Entry { instance, origin: Origin::Listed, updated, missed: None });
        }
    }

    /// An insert ended without creating its VM as far as the controller
    /// knows: an entry that only expected it goes.
    pub fn not_created(&mut self, zone: &str, name: &str) {
        let key = (zone.to_string(), name.to_string());
        if self.entries.get(&key).is_some_and(|e| e.origin == Origin::Expected) {
            self.next();
            self.remove_entry(&key);
        }
    }

    /// A delete finished, or a VM was verified gone: it is absent.
    pub fn gone(&mut self, zone: &str, name: &str) -> Option<String> {
        let key = (zone.to_string(), name.to_string());
        let at = self.next();
        self.tombstones.insert(key.clone(), at);
        self.remove_entry(&key).and_then(|e| owner_of(&e.instance).cloned())
    }

    /// A label change finished: the VM carries these labels now.
    pub fn relabelled(&mut self, zone: &str, name: &str, labels: BTreeMap<String, String>) -> Changed {
        let key = (zone.to_string(), name.to_string());
        let updated = self.next();
        let Some(mut entry) = self.entries.get(&key).cloned() else { return Changed::new() };
        let mut changed: Changed = owner_of(&entry.instance).cloned().into_iter().collect();
        entry.instance.labels = labels;
        entry.updated = updated;
        changed.extend(owner_of(&entry.instance).cloned());
        self.insert_entry(key, entry);
        changed
    }

    /// What is known of one VM.
    pub fn presence(&self, zone: &str, name: &str) -> Presence<'_> {
        match self.entries.get(&(zone.to_string(), name.to_string())) {
            Some(entry) => Presence::Present(entry),
            None if self.zone_known(zone) => Presence::Absent,
            None => Presence::Unknown,
        }
    }

    /// What the last list vouches for: like [`Self::presence`], but a zone
    /// that list could not see is unknown even for a VM an older list
    /// showed.
    pub fn presence_now(&self, zone: &str, name: &str) -> Presence<'_> {
        if self.zone_known(zone) { self.presence(zone, name) } else { Presence::Unknown }
    }

    /// Whether a list that started after `since` covered the zone and did
    /// not show the VM (and nothing local brought it back).
    pub fn absent_since(&self, zone: &str, name: &str, since: u64) -> bool {
        self.listed_at.is_some_and(|at| at > since) && matches!(self.presence(zone, name), Presence::Absent)
    }

    /// Whether a list that started after `since` covered the zone and did
    /// not show the VM, even if its insert is still expected to create it.
    pub fn unlisted_since(&self, zone: &str, name: &str, since: u64) -> bool {
        match self.entries.get(&(zone.to_string(), name.to_string())) {
            Some(entry) => entry.missed.is_some_and(|at| at > since),
            None => self.absent_since(zone, name, since),
        }
    }

    /// The VMs of one owner (by owner uid label value).
    pub fn owned(&self, owner: &str) -> Vec<Instance> {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|key| self.entries.get(key))
            .map(|e| e.instance.clone())
            .collect()
    }

    /// Every VM held that a list showed (for the orphan scan).
    pub fn listed(&self) -> Vec<Instance> {
        self.entries.values().filter(|e| e.origin == Origin::Listed).map(|e| e.instance.clone()).collect()
    }

    /// Every VM held, with its entry.
    pub fn entries(&self) -> impl Iterator<Item = (&VmKey, &Entry)> {
        self.entries.iter()
    }
}

/// What a planner sees of the cloud: the VMs of its object, and how far
/// their absence can be trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmView {
    /// The object's VMs (listed, or with an accepted insert).
    pub vms: Vec<Instance>,
    /// A list was applied: absence facts exist at all.
    pub synced: bool,
    /// Zones whose absence facts cannot be trusted now.
    pub unknown_zones: BTreeSet<String>,
}

impl VmView {
    /// A view with these VMs and complete knowledge (for tests and pure callers).
    pub fn complete(vms: Vec<Instance>) -> Self {
        Self { vms, synced: true, unknown_zones: BTreeSet::new() }
    }

    /// The view of `owner` in `state`.
    pub fn of(state: &InventoryState, owner: &str) -> Self {
        Self { vms: state.owned(owner), synced: state.synced(), unknown_zones: state.unreachable().clone() }
    }

    /// Whether the VM is among the object's VMs.
    pub fn has(&self, zone: &str, name: &str) -> bool {
        self.vms.iter().any(|v| v.zone == zone && v.name == name)
    }

    /// Whether the VM is known not to exist: only then may a planner act on
    /// its absence (burn an attempt, drop an instance).
    pub fn absent(&self, zone: &str, name: &str) -> bool {
        self.synced && !self.unknown_zones.contains(zone) && !self.has(zone, name)
    }

    /// Whether the view covers every zone: only then may "no VM left" be believed.
    pub fn is_complete(&self) -> bool {
        self.synced && self.unknown_zones.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(zone: &str, name: &str, owner: &str) -> Instance {
        Instance {
            name: name.into(),
            zone: zone.into(),
            status: InstanceStatus::Running,
            labels: BTreeMap::from([(LABEL_OWNER_UID.to_string(), owner.to_string())]),
            label_fingerprint: String::new(),
            metadata: BTreeMap::new(),
            creation_timestamp: Some("2026-01-01T00:00:00Z".into()),
        }
    }

    fn listing(vms: Vec<Instance>, unreachable: &[&str]) -> Listing {
        Listing { instances: vms, unreachable: unreachable.iter().map(|z| z.to_string()).collect(), pages: 1 }
    }

    #[test]
    fn nothing_is_absent_before_the_first_list() {
        let mut s = InventoryState::default();
        assert_eq!(s.presence("a", "x"), Presence::Unknown);
        assert!(!VmView::of(&s, "o").absent("a", "x"));
        let started = s.begin_list();
        s.apply_list(started, listing(vec![], &[]));
        assert_eq!(s.presence("a", "x"), Presence::Absent);
        assert!(VmView::of(&s, "o").absent("a", "x"));
    }

    #[test]
    fn an_unreachable_zone_keeps_its_vms_and_never_reads_as_absent() {
        let mut s = InventoryState::default();
        let t = s.begin_list();
        s.apply_list(t, listing(vec![vm("a", "x", "o"), vm("b", "y", "o")], &[]));
        let t = s.begin_list();
        let changed = s.apply_list(t, listing(vec![], &["a"]));
        assert_eq!(changed, Changed::from(["o".to_string()]), "y in the reachable zone b is gone");
        assert!(matches!(s.presence("a", "x"), Presence::Present(_)), "x is kept: zone a was not seen");
        assert_eq!(s.presence_now("a", "x"), Presence::Unknown, "but the last list cannot vouch for it");
        assert_eq!(s.presence_now("b", "y"), Presence::Absent);
        assert_eq!(s.presence("a", "never-seen"), Presence::Unknown);
        assert_eq!(s.presence("b", "y"), Presence::Absent);
        let view = VmView::of(&s, "o");
        assert!(!view.is_complete());
        assert!(!view.absent("a", "x") && !view.absent("a", "never-seen"));
        // The zone answers again without x: now it is gone.
        let t = s.begin_list();
        s.apply_list(t, listing(vec![], &[]));
        assert_eq!(s.presence("a", "x"), Presence::Absent);
    }

    #[test]
    fn a_list_that_started_before_a_local_change_does_not_undo_it() {
        let mut s = InventoryState::default();
        let t0 = s.begin_list();
        s.apply_list(t0, listing(vec![vm("a", "old", "o")], &[]));
        let during = s.begin_list();
        // While the list runs: an insert is accepted and a delete finishes.
        s.expect(vm("a", "new", "o"));
        s.gone("a", "old");
        s.apply_list(during, listing(vec![vm("a", "old", "o")], &[]));
        assert!(matches!(s.presence("a", "new"), Presence::Present(e) if e.origin == Origin::Expected));
        assert_eq!(s.presence("a", "old"), Presence::Absent, "the delete finished after the list started");
        // A later list decides: the new VM is listed, the old one stays gone.
        let after = s.begin_list();
        s.apply_list(after, listing(vec![vm("a", "new", "o")], &[]));
        assert!(matches!(s.presence("a", "new"), Presence::Present(e) if e.origin == Origin::Listed));
        assert!(s.absent_since("a", "old", during));
    }

    #[test]
    fn an_older_list_is_ignored() {
        let mut s = InventoryState::default();
        let first = s.begin_list();
        let second = s.begin_list();
        s.apply_list(second, listing(vec![], &[]));
        s.apply_list(first, listing(vec![vm("a", "x", "o")], &[]));
        assert_eq!(s.presence("a", "x"), Presence::Absent);
    }

    #[test]
    fn relabelling_moves_a_vm_between_owners() {
        let mut s = InventoryState::default();
        let t = s.begin_list();
        s.apply_list(t, listing(vec![vm("a", "x", "pool")], &[]));
        let labels = BTreeMap::from([(LABEL_OWNER_UID.to_string(), "run".to_string())]);
        let changed = s.relabelled("a", "x", labels);
        assert_eq!(changed, Changed::from(["pool".to_string(), "run".to_string()]));
        assert!(s.owned("pool").is_empty());
        assert_eq!(s.owned("run").len(), 1);
    }

    #[test]
    fn an_expected_vm_outlives_lists_that_do_not_show_it_yet_and_ends_with_its_insert() {
        let mut s = InventoryState::default();
        s.expect(vm("a", "slow", "o"));
        s.expect(vm("a", "failed", "o"));
        // Lists start after the inserts were accepted, but the cloud does
        // not show the VMs yet.
        let t = s.begin_list();
        s.apply_list(t, listing(vec![], &[]));
        assert!(matches!(s.presence("a", "slow"), Presence::Present(e) if e.origin == Origin::Expected));
        s.created("a", "slow", None);
        assert!(matches!(s.presence("a", "slow"), Presence::Present(e) if e.origin == Origin::Listed));
        s.not_created("a", "failed");
        assert_eq!(s.presence("a", "failed"), Presence::Absent);
        // not_created never removes a VM a list showed.
        s.not_created("a", "slow");
        assert!(matches!(s.presence("a", "slow"), Presence::Present(_)));
        // A finished insert whose entry is missing is put back as requested.
        s.created("a", "back", Some(vm("a", "back", "o")));
        assert_eq!(s.owned("o").len(), 2);
        // But not over a finished delete.
        s.gone("a", "deleted");
        s.created("a", "deleted", Some(vm("a", "deleted", "o")));
        assert_eq!(s.presence("a", "deleted"), Presence::Absent);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Expect(u8),
        /// The insert finished: from now on lists show the VM.
        Created(u8),
        Gone(u8),
        /// Finishes the oldest list in flight and starts a new one, which
        /// sees the cloud as it is at its start or at its end; zone `b` may
        /// be unreachable.
        List {
            b_unreachable: bool,
            at_end: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..6).prop_map(Step::Expect),
            (0u8..6).prop_map(Step::Created),
            (0u8..6).prop_map(Step::Gone),
            (any::<bool>(), any::<bool>()).prop_map(|(b_unreachable, at_end)| Step::List { b_unreachable, at_end }),
        ]
    }

    fn key(i: u8) -> (String, String) {
        (if i.is_multiple_of(2) { "a" } else { "b" }.to_string(), format!("vm-{i}"))
    }

    proptest! {
        /// Whatever the order of local calls and lists (each list seeing
        /// the cloud at its start or its end, and a VM whose insert is
        /// still running possibly not yet), a VM that exists in the cloud
        /// is never reported absent.
        #[test]
        fn an_existing_vm_is_never_read_as_absent(steps in proptest::collection::vec(step(), 1..60)) {
            let mut s = InventoryState::default();
            let mut cloud: BTreeSet<(String, String)> = BTreeSet::new();
            // VMs whose insert finished: lists show them.
            let mut visible: BTreeSet<(String, String)> = BTreeSet::new();
            // Lists in flight: (sequence at start, what lists could show
            // then, b unreachable, whether it shows the cloud at its end instead).
            type InFlight = (u64, BTreeSet<(String, String)>, bool, bool);
            let mut pending: Vec<InFlight> = Vec::new();
            for step in steps {
                match step {
                    Step::Expect(i) => {
                        let (zone, name) = key(i);
                        if cloud.insert((zone.clone(), name.clone())) {
                            s.expect(vm(&zone, &name, "o"));
                        }
                    }
                    Step::Created(i) => {
                        let (zone, name) = key(i);
                        if cloud.contains(&(zone.clone(), name.clone())) && visible.insert((zone.clone(), name.clone())) {
                            s.created(&zone, &name, Some(vm(&zone, &name, "o")));
                        }
                    }
                    Step::Gone(i) => {
                        let (zone, name) = key(i);
                        cloud.remove(&(zone.clone(), name.clone()));
                        visible.remove(&(zone.clone(), name.clone()));
                        s.gone(&zone, &name);
                    }
                    Step::List { b_unreachable, at_end } => {
                        if let Some((started, at_start, b, end)) = (!pending.is_empty()).then(|| pending.remove(0)) {
                            let seen = if end { visible.clone() } else { at_start };
                            let vms = seen.iter().filter(|(z, _)| !(b && z == "b")).map(|(z, n)| vm(z, n, "o")).collect();
                            s.apply_list(started, listing(vms, if b { &["b"] } else { &[] }));
                        }
                        let started = s.begin_list();
                        pending.push((started, visible.clone(), b_unreachable, at_end));
                    }
                }
                for (zone, name) in &cloud {
                    prop_assert_ne!(s.presence(zone, name), Presence::Absent, "{}/{} exists", zone, name);
                    prop_assert!(!VmView::of(&s, "o").absent(zone, name));
                }
            }
        }
    }
}
