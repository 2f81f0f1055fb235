//! Reconcile slots: at most N reconciles at once, handed out in the order
//! they were asked for, launches before follow-ups.
//!
//! kube-runtime's own bound picks among waiting objects in hash order, so
//! under load an early object can wait behind every later one. Here the
//! runner starts every due reconcile and each waits (as a small future) for
//! a slot: first those that launch VMs for a TestRun nothing was asked for
//! yet (a VM's boot is the long pole of a run, and everything after waits on
//! it), then everything else, each lane first come, first served. So that
//! a steady stream of launches cannot starve results and deletes, a
//! follow-up that has waited [`FOLLOW_PATIENCE`] goes before launches.
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

/// How long a follow-up waits behind launches at most: after that it is
/// next. A burst of new runs launches first; a steady stream of them
/// cannot starve results and deletes.
pub const FOLLOW_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Debug)]
struct State {
    free: usize,
    launch: VecDeque<oneshot::Sender<Slot>>,
    /// Follow-ups, with when each started waiting.
    follow: VecDeque<(tokio::time::Instant, oneshot::Sender<Slot>)>,
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
                    Lane::Follow => state.follow.push_back((tokio::time::Instant::now(), sender)),
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
    /// follow-up that has waited [`FOLLOW_PATIENCE`] first), or frees it.
    fn release(self: &Arc<Self>) {
        loop {
            let next = {
                let mut state = self.state();
                let overdue = state.follow.front().is_some_and(|(since, _)| since.elapsed() >= FOLLOW_PATIENCE);
                let next = if overdue {
                    state.follow.pop_front().map(|(_, sender)| sender)
                } else {
                    state.launch.pop_front().or_else(|| state.follow.pop_front().map(|(_, sender)| sender))
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

    #[tokio::test(start_paused = true)]
    async fn a_follow_up_that_waited_long_enough_goes_before_launches() {
        let slots = Slots::new(1);
        let held = slots.acquire(Lane::Launch).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |name: &'static str, lane: Lane| {
            let (slots, order) = (slots.clone(), order.clone());
            tokio::spawn(async move {
                let slot = slots.acquire(lane).await.unwrap();
                order.lock().unwrap().push(name);
                slot
            })
        };
        let follow = spawn("follow", Lane::Follow);
        settle().await;
        let launch = spawn("launch", Lane::Launch);
        settle().await;
        // Not yet overdue: the launch goes first.
        drop(held);
        let slot = launch.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["launch"]);
        let late = spawn("late launch", Lane::Launch);
        settle().await;
        tokio::time::advance(FOLLOW_PATIENCE).await;
        // Overdue: the follow-up goes before the launch that came later.
        drop(slot);
        let slot = follow.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["launch", "follow"]);
        drop(slot);
        drop(late.await.unwrap());
        assert_eq!(*order.lock().unwrap(), ["launch", "follow", "late launch"]);
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
