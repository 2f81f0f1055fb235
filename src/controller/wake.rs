//! Who to wake when something about a VM changes: the inventory, the
//! operation tracker and the agent API know a VM's owner by its uid; the
//! controllers need an object reference. Every reconcile registers its
//! object; waking sends it to its controller's queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::prebuild::PrebuildPreset;
use crate::api::testrun::TestRun;
use crate::inventory::OwnerWake;

/// An object that owns VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A TestRun.
    TestRun(ObjectRef<TestRun>),
    /// A PrebuildPreset.
    Preset(ObjectRef<PrebuildPreset>),
}

/// The owners by uid (as a label value), and the controllers' queues.
pub struct Wakers {
    runs: UnboundedSender<ObjectRef<TestRun>>,
    presets: UnboundedSender<ObjectRef<PrebuildPreset>>,
    owners: Mutex<HashMap<String, Owner>>,
}

impl Wakers {
    /// Wakers sending to these queues.
    pub fn new(
        runs: UnboundedSender<ObjectRef<TestRun>>,
        presets: UnboundedSender<ObjectRef<PrebuildPreset>>,
    ) -> Arc<Self> {
        Arc::new(Self { runs, presets, owners: Mutex::new(HashMap::new()) })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owner>> {
        self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers an object by its uid.
    pub fn register(&self, uid: &str, owner: Owner) {
        let mut owners = self.owners();
        if owners.get(uid) != Some(&owner) {
            owners.insert(uid.to_string(), owner);
        }
    }

    /// Forgets an object (it is gone).
    pub fn forget(&self, uid: &str) {
        self.owners().remove(uid);
    }

    /// Keeps only the objects whose uid label value `keep` names.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.owners().retain(|uid, _| keep(uid));
    }

    /// How many objects are known.
    pub fn len(&self) -> usize {
        self.owners().len()
    }

    /// Whether no object is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks for a reconcile of the object with this uid, if known.
    pub fn wake(&self, uid: &str) {
        let owner = self.owners().get(uid).cloned();
        match owner {
            Some(Owner::TestRun(r)) => {
                let _ = self.runs.send(r);
            }
            Some(Owner::Preset(r)) => {
                let _ = self.presets.send(r);
            }
            None => {}
        }
    }

    /// Asks for a reconcile of a TestRun.
    pub fn wake_run(&self, run: ObjectRef<TestRun>) {
        let _ = self.runs.send(run);
    }

    /// Asks for a reconcile of a PrebuildPreset.
    pub fn wake_preset(&self, preset: ObjectRef<PrebuildPreset>) {
        let _ = self.presets.send(preset);
    }

    /// The waking function the inventory and the tracker use.
    pub fn as_owner_wake(self: &Arc<Self>) -> OwnerWake {
        let me = self.clone();
        Arc::new(move |uid: &str| me.wake(uid))
    }
}
