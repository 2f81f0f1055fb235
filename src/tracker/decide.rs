//! What the tracker does next with one operation, as a pure function of the
//! operation, what the inventory knows and the time.
//!
//! Evidence comes first, because it is free: an insert whose VM a list shows
//! booted is done; a delete whose VM a list that started after the delete
//! was accepted does not show is done. An operation is read only when no
//! evidence came within its patience (then with doubling pauses), and an
//! operation that has not ended by its deadline is settled by looking at
//! the VM itself. Nothing is polled forever.

use std::time::Duration;

use tokio::time::Instant;

use crate::api::OperationKind;
use crate::compute::InstanceStatus;
use crate::inventory::state::{InventoryState, Origin, Presence};

/// How patient the tracker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    /// Time after acceptance before an operation without evidence is read.
    pub first_read: Duration,
    /// Longest pause between two reads of one operation.
    pub max_pause: Duration,
    /// Time after acceptance when an unfinished operation is settled by
    /// looking at its VM.
    pub deadline: Duration,
    /// Time after acceptance when an insert asks for a list to look for its VM.
    pub insert_list_after: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Self {
            first_read: Duration::from_secs(2),
            max_pause: Duration::from_secs(60),
            deadline: Duration::from_secs(600),
            insert_list_after: Duration::from_secs(1),
        }
    }
}

/// An accepted operation the tracker follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Insert, delete or label change.
    pub kind: OperationKind,
    /// Zone.
    pub zone: String,
    /// The VM.
    pub instance: String,
    /// When the call was accepted.
    pub accepted: Instant,
    /// The inventory's sequence number when it was accepted.
    pub accepted_seq: u64,
    /// Reads made so far.
    pub reads: u32,
    /// When to read it next.
    pub next_read: Instant,
}

/// What the tracker does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// The operation is known to have succeeded.
    Done,
    /// Read the operation now.
    Read,
    /// Past the deadline: look at the VM (a list, then a get).
    Settle,
    /// Nothing yet: look again by `until`; ask for a list that starts after
    /// this sequence number, if set.
    Wait {
        /// When to look again.
        until: Instant,
        /// A list that starts after this is wanted.
        list_after: Option<u64>,
    },
}

fn booted(status: &InstanceStatus) -> bool {
    !matches!(status, InstanceStatus::Provisioning | InstanceStatus::Staging)
}

/// Decides what to do with one accepted operation.
pub fn decide(op: &Running, inventory: &InventoryState, now: Instant, patience: &Patience) -> Next {
    match op.kind {
        OperationKind::Insert => {
            if let Presence::Present(entry) = inventory.presence(&op.zone, &op.instance)
                && entry.origin == Origin::Listed
                && entry.updated > op.accepted_seq
                && booted(&entry.instance.status)
            {
                return Next::Done;
            }
            if op.reads == 0 && inventory.unlisted_since(&op.zone, &op.instance, op.accepted_seq) {
                // A list after the insert does not show the VM: it most
                // likely failed; the operation says why.
                return Next::Read;
            }
        }
        OperationKind::Delete => {
            if inventory.absent_since(&op.zone, &op.instance, op.accepted_seq) {
                return Next::Done;
            }
        }
        OperationKind::SetLabels => {}
    }
    if now >= op.accepted + patience.deadline {
        return Next::Settle;
    }
    if now >= op.next_read {
        return Next::Read;
    }
    let list_after = match op.kind {
        OperationKind::Delete => Some(op.accepted_seq),
        OperationKind::Insert if now >= op.accepted + patience.insert_list_after => Some(op.accepted_seq),
        _ => None,
    };
    wait(op, now, patience, list_after)
}

fn wait(op: &Running, now: Instant, patience: &Patience, list_after: Option<u64>) -> Next {
    let mut until = op.next_read.min(op.accepted + patience.deadline);
    if op.kind == OperationKind::Insert && list_after.is_none() {
        until = until.min(op.accepted + patience.insert_list_after);
    }
    Next::Wait { until: until.max(now), list_after }
}

/// When to read an operation again after `reads` reads that found it unfinished.
pub fn next_read_after(now: Instant, reads: u32, patience: &Patience) -> Instant {
    let pause = patience.first_read.saturating_mul(2u32.saturating_pow(reads.min(16))).min(patience.max_pause);
    now + pause
}

/// What looking at the VM of a settled operation showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Looked {
    /// The VM exists.
    Present,
    /// Neither a full list nor a get found it.
    Absent,
}

/// The outcome of a settled operation: `true` when it counts as done.
pub fn settled(kind: OperationKind, looked: Looked) -> bool {
    match (kind, looked) {
        // The VM exists: the insert happened (whether it boots is the
        // registration timeout's business).
        (OperationKind::Insert, Looked::Present) => true,
        (OperationKind::Insert, Looked::Absent) => false,
        (OperationKind::Delete, Looked::Absent) => true,
        (OperationKind::Delete, Looked::Present) => false,
        (OperationKind::SetLabels, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::naming::LABEL_OWNER_UID;
    use crate::compute::{Instance, Listing};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn vm(name: &str, status: InstanceStatus) -> Instance {
        Instance {
            name: name.into(),
            zone: "z".into(),
            status,
            labels: BTreeMap::from([(LABEL_OWNER_UID.to_string(), "o".to_string())]),
            label_fingerprint: String::new(),
            metadata: BTreeMap::new(),
            creation_timestamp: None,
        }
    }

    fn list(s: &mut InventoryState, vms: Vec<Instance>, unreachable: &[&str]) {
        let started = s.begin_list();
        s.apply_list(
            started,
            Listing { instances: vms, unreachable: unreachable.iter().map(|z| z.to_string()).collect(), pages: 1 },
        );
    }

    fn running(kind: OperationKind, s: &InventoryState, now: Instant, p: &Patience) -> Running {
        Running {
            kind,
            zone: "z".into(),
            instance: "x".into(),
            accepted: now,
            accepted_seq: s.seq(),
            reads: 0,
            next_read: now + p.first_read,
        }
    }

    #[test]
    fn a_delete_is_done_when_a_later_list_lacks_its_vm() {
        let p = Patience::default();
        let now = Instant::now();
        let mut s = InventoryState::default();
        list(&mut s, vec![vm("x", InstanceStatus::Running)], &[]);
        let op = running(OperationKind::Delete, &s, now, &p);
        assert_eq!(
            decide(&op, &s, now, &p),
            Next::Wait { until: now + p.first_read, list_after: Some(op.accepted_seq) }
        );
        list(&mut s, vec![vm("x", InstanceStatus::Stopping)], &[]);
        assert!(matches!(decide(&op, &s, now, &p), Next::Wait { .. }), "still there");
        list(&mut s, vec![], &["z"]);
        assert!(matches!(decide(&op, &s, now, &p), Next::Wait { .. }), "an unreachable zone proves nothing");
        list(&mut s, vec![], &[]);
        assert_eq!(decide(&op, &s, now, &p), Next::Done);
    }

    #[test]
    fn an_insert_is_done_when_its_vm_is_listed_booted() {
        let p = Patience::default();
        let now = Instant::now();
        let mut s = InventoryState::default();
        list(&mut s, vec![], &[]);
        let op = running(OperationKind::Insert, &s, now, &p);
        s.expect(vm("x", InstanceStatus::Provisioning));
        assert!(matches!(decide(&op, &s, now, &p), Next::Wait { list_after: None, .. }));
        let later = now + p.insert_list_after;
        assert!(matches!(decide(&op, &s, later, &p), Next::Wait { list_after: Some(_), .. }));
        list(&mut s, vec![vm("x", InstanceStatus::Staging)], &[]);
        assert!(matches!(decide(&op, &s, later, &p), Next::Wait { .. }), "not booted yet");
        list(&mut s, vec![vm("x", InstanceStatus::Running)], &[]);
        assert_eq!(decide(&op, &s, later, &p), Next::Done);
    }

    #[test]
    fn an_insert_whose_vm_a_later_list_lacks_is_read_at_once() {
        let p = Patience::default();
        let now = Instant::now();
        let mut s = InventoryState::default();
        list(&mut s, vec![], &[]);
        let op = running(OperationKind::Insert, &s, now, &p);
        s.expect(vm("x", InstanceStatus::Provisioning));
        list(&mut s, vec![], &[]);
        assert_eq!(decide(&op, &s, now, &p), Next::Read);
    }

    #[test]
    fn reads_back_off_and_the_deadline_settles() {
        let p = Patience::default();
        let start = Instant::now();
        let mut s = InventoryState::default();
        list(&mut s, vec![vm("x", InstanceStatus::Running)], &[]);
        let mut op = running(OperationKind::Delete, &s, start, &p);
        let mut now = start;
        let mut reads = Vec::new();
        loop {
            match decide(&op, &s, now, &p) {
                Next::Read => {
                    reads.push(now - start);
                    op.reads += 1;
                    op.next_read = next_read_after(now, op.reads, &p);
                }
                Next::Wait { until, .. } => now = until,
                Next::Settle => break,
                Next::Done => panic!("the VM is still there"),
            }
            assert!(reads.len() < 100, "polled forever");
        }
        assert_eq!(now - start, p.deadline);
        assert_eq!(reads[0], p.first_read);
        assert!(reads.windows(2).all(|w| w[1] - w[0] <= p.max_pause + Duration::from_millis(1)));
        assert!(reads.len() <= 15, "{} reads in {:?}", reads.len(), p.deadline);
    }

    proptest! {
        /// Whatever the lists show and however time passes, every operation
        /// ends: done by evidence, or read, or settled by its deadline.
        #[test]
        fn every_operation_ends(kind in 0u8..3, steps in proptest::collection::vec((0u64..120_000, 0u8..4), 1..40)) {
            let kind = [OperationKind::Insert, OperationKind::Delete, OperationKind::SetLabels][kind as usize];
            let p = Patience::default();
            let start = Instant::now();
            let mut s = InventoryState::default();
            list(&mut s, vec![vm("x", InstanceStatus::Staging)], &[]);
            let mut op = running(kind, &s, start, &p);
            let mut now = start;
            for (millis, what) in steps {
                now += Duration::from_millis(millis);
                match what {
                    0 => list(&mut s, vec![vm("x", InstanceStatus::Staging)], &[]),
                    1 => list(&mut s, vec![], &["z"]),
                    _ => {}
                }
                match decide(&op, &s, now, &p) {
                    Next::Read => { op.reads += 1; op.next_read = next_read_after(now, op.reads, &p); }
                    Next::Wait { until, .. } => {
                        prop_assert!(until >= now);
                        prop_assert!(until <= op.accepted + p.deadline, "never waits past the deadline");
                    }
                    Next::Settle => prop_assert!(now >= op.accepted + p.deadline),
                    Next::Done => prop_assert!(kind != OperationKind::SetLabels),
                }
            }
            // Past the deadline, an operation without evidence is settled.
            let late = op.accepted + p.deadline;
            prop_assert!(matches!(decide(&op, &s, late.max(now), &p), Next::Settle | Next::Done | Next::Read));
        }
    }
}
