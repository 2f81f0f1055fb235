//! Reconcile slots: at most N reconciles at once, handed out in the order
//! they were asked for, launches before follow-ups.
//!
//! kube-runtime's own bound picks among waiting objects in hash order, so
//! under load an early object can wait behind every later one. Here the
//! runner starts every due reconcile and each waits (as a small future) for
//! a slot: first those that launch VMs for a TestRun nothing was asked for
//! yet (a VM's boot is the long pole of a run, and everything after waits on
//! it), then everything else, each lane first come, first served. So that
//! a steady stream of launches cannot starve results and deletes, every
//! [`FOLLOW_EVERY`]th slot handed over goes to a follow-up if one waits.
//! On shutdown the slots close: waiters end at once instead of each
//! running in turn.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// Which queue a reconcile waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Its object has asked for no VM yet.
    Launch,
    /// Anything else.
    Follow,
}

/// One in this many slots handed to a waiter goes to the follow-up lane
/// first.
pub const FOLLOW_EVERY: u64 = 4;

#[derive(Debug)]
struct State {
    free: usize,
    launch: VecDeque<oneshot::Sender<Slot>>,
    follow: VecDeque<oneshot::Sender<Slot>>,
    /// Slots handed to waiters so far.
    handed: u64,
    /// Shutting down: no slot is handed out any more.
    closed: bool,
}

/// A fixed number of reconcile slots.
#[derive(Debug)]
pub struct Slots {
    state: Mutex<State>,
}

/// One slot, held while a reconcile runs; dropping it passes it on.
#[derive(Debug)]
pub struct Slot {
    slots: Option<Arc<Slots>>,
}

impl Slots {
    /// `n` slots (at least one).
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: n.max(1),
                launch: VecDeque::new(),
                follow: VecDeque::new(),
                handed: 0,
                closed: false,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot in `lane`; `None` once the slots are closed.
    pub async fn acquire(self: &Arc<Self>, lane: Lane) -> Option<Slot> {
        loop {
            let receiver = {
                let mut state = self.state();
                if state.closed {
                    return None;
                }
                if state.free > 0 {
                    state.free -= 1;
                    return Some(Slot { slots: Some(self.clone()) });
                }
                let (sender, receiver) = oneshot::channel();
                match lane {
                    Lane::Launch => state.launch.push_back(sender),
                    Lane::Follow => state.follow.push_back(sender),
                }
                receiver
            };
            // A sender is dropped after handing its slot over, or on close.
            if let Ok(slot) = receiver.await {
                return Some(slot);
            }
        }
    }

    /// Closes the slots: every waiter, and every later caller, gets `None`.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.launch.clear();
        state.follow.clear();
    }

    /// Slots free now.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.state().free
    }

    /// Reconciles waiting for a slot, by lane.
    #[cfg(test)]
    fn waiting(&self) -> (usize, usize) {
        let state = self.state();
        (state.launch.len(), state.follow.len())
    }

    /// Passes a slot to the next waiter (launches first, but every
    /// [`FOLLOW_EVERY`]th to a follow-up), or frees it.
    fn release(self: &Arc<Self>) {
        loop {
            let next = {
                let mut state = self.state();
                state.handed += 1;
                let next = if state.handed.is_multiple_of(FOLLOW_EVERY) {
                    state.follow.pop_front().or_else(|| state.launch.pop_front())
                } else {
                    state.launch.pop_front().or_else(|| state.follow.pop_front())
                };
                match next {
                    Some(next) => next,
                    None => {
                        state.free += 1;
                        return;
                    }
                }
            };
            match next.send(Slot { slots: Some(self.clone()) }) {
                Ok(()) => return,
                // That waiter gave up: the slot goes to the one after it.
                Err(mut unclaimed) => {
                    unclaimed.slots = None;
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn launches_go_first_then_first_come_first_served() {
        let slots = Slots::new(1);
        let held = slots.acquire(Lane::Follow).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, lane) in [("f1", Lane::Follow), ("l1", Lane::Launch), ("f2", Lane::Follow), ("l2", Lane::Launch)] {
            let (slots, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire(lane).await.unwrap();
                order.lock().unwrap().push(name);
            }));
            settle().await;
        }
        assert_eq!(slots.waiting(), (2, 2));
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["l1", "l2", "f1", "f2"]);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn follow_ups_get_every_fourth_slot_under_a_stream_of_launches() {
        let slots = Slots::new(1);
        let held = slots.acquire(Lane::Launch).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let mut queue: Vec<(String, Lane)> = vec![("f1".into(), Lane::Follow), ("f2".into(), Lane::Follow)];
        queue.extend((1..=8).map(|i| (format!("l{i}"), Lane::Launch)));
        for (name, lane) in queue {
            let (slots, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire(lane).await.unwrap();
                order.lock().unwrap().push(name);
            }));
            settle().await;
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["l1", "l2", "l3", "f1", "l4", "l5", "l6", "f2", "l7", "l8"]);
    }

    #[tokio::test]
    async fn closing_ends_every_waiter_and_refuses_later_callers() {
        let slots = Slots::new(1);
        let held = slots.acquire(Lane::Launch).await.unwrap();
        let waiters: Vec<_> = [Lane::Launch, Lane::Follow]
            .into_iter()
            .map(|lane| {
                let slots = slots.clone();
                tokio::spawn(async move { slots.acquire(lane).await.is_none() })
            })
            .collect();
        settle().await;
        slots.close();
        for waiter in waiters {
            assert!(waiter.await.unwrap(), "a waiter got a slot after close");
        }
        assert!(slots.acquire(Lane::Launch).await.is_none());
        drop(held);
        assert_eq!(slots.waiting(), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_the_slot() {
        let slots = Slots::new(1);
        let held = slots.acquire(Lane::Launch).await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(10), slots.acquire(Lane::Launch)).await;
        assert!(gave_up.is_err());
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(Lane::Follow).await }
        });
        settle().await;
        drop(held);
        let slot = waiting.await.unwrap().unwrap();
        assert_eq!(slots.free(), 0);
        drop(slot);
        assert_eq!(slots.free(), 1);
        assert_eq!(slots.waiting(), (0, 0));
    }

    #[tokio::test]
    async fn never_more_than_n_at_once() {
        let slots = Slots::new(3);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (slots, running, most) = (slots.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    let lane = if i % 3 == 0 { Lane::Launch } else { Lane::Follow };
                    let _slot = slots.acquire(lane).await.unwrap();
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(slots.free(), 3);
    }
}
