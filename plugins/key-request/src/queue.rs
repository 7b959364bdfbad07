//! The lookup queue: tasks wait here for a worker, and tasks asking for a lookup
//! already queued or running join it, so one provider call answers all of them.
//! The number of waiting tasks is bounded; past the bound a task is refused at
//! once rather than queued.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("queue full: {0} lookups waiting")]
pub struct QueueFull(pub usize);

/// What became of a submitted task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// A new lookup was queued for it.
    New,
    /// It joined a lookup already queued or running.
    Joined,
}

#[derive(Debug)]
struct State<K, W> {
    /// Lookups not yet taken by a worker, oldest first.
    pending: VecDeque<K>,
    /// Every queued or running lookup and the tasks waiting for it.
    waiters: HashMap<K, Vec<W>>,
    /// Tasks in `waiters`.
    waiting: usize,
    stopped: bool,
}

/// A bounded, de-duplicating queue of lookups `K`, each with its waiting tasks `W`.
#[derive(Debug)]
pub struct Queue<K, W> {
    state: Mutex<State<K, W>>,
    work: Condvar,
    idle: Condvar,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, W> Queue<K, W> {
    /// A queue holding at most `capacity` waiting tasks.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                waiters: HashMap::new(),
                waiting: 0,
                stopped: false,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K, W>> {
        // A worker that panicked left the state consistent: every change is one step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `waiter` for `key`, joining a lookup for the same key if there is one.
    pub fn submit(&self, key: K, waiter: W) -> Result<Submitted, QueueFull> {
        let mut s = self.lock();
        if s.waiting >= self.capacity {
            return Err(QueueFull(s.waiting));
        }
        s.waiting += 1;
        if let Some(list) = s.waiters.get_mut(&key) {
            list.push(waiter);
            return Ok(Submitted::Joined);
        }
        s.waiters.insert(key.clone(), vec![waiter]);
        s.pending.push_back(key);
        drop(s);
        self.work.notify_one();
        Ok(Submitted::New)
    }

    /// Waits for the next lookup to perform; `None` once stopped. The lookup keeps
    /// collecting waiters until [`Queue::finish`].
    pub fn next(&self) -> Option<K> {
        let mut s = self.lock();
        loop {
            if s.stopped {
                return None;
            }
            if let Some(k) = s.pending.pop_front() {
                return Some(k);
            }
            s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends the lookup for `key`: returns its waiters, which no longer count as
    /// joinable but still count as waiting until [`Queue::answered`].
    pub fn finish(&self, key: &K) -> Vec<W> {
        self.lock().waiters.remove(key).unwrap_or_default()
    }

    /// `n` waiters taken by [`Queue::finish`] have been answered; returns whether
    /// nothing is waiting now (a good moment to flush).
    pub fn answered(&self, n: usize) -> bool {
        let mut s = self.lock();
        s.waiting = s.waiting.saturating_sub(n);
        let idle = s.waiting == 0;
        drop(s);
        if idle {
            self.idle.notify_all();
        }
        idle
    }

    /// Tasks waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Waits up to `limit` for every waiting task to be answered; whether they were.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut s = self.lock();
        while s.waiting > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.idle.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Stops the workers (after their current lookup) and returns every task still
    /// waiting, so the caller can answer them.
    pub fn stop(&self) -> Vec<W> {
        let mut s = self.lock();
        s.stopped = true;
        s.pending.clear();
        let left: Vec<W> = s.waiters.drain().flat_map(|(_, w)| w).collect();
        s.waiting = 0;
        drop(s);
        self.work.notify_all();
        self.idle.notify_all();
        left
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn identical_lookups_share_one_entry_and_the_bound_counts_tasks() {
        let q: Queue<&str, u32> = Queue::new(3);
        assert_eq!(q.submit("a", 1), Ok(Submitted::New));
        assert_eq!(q.submit("a", 2), Ok(Submitted::Joined));
        assert_eq!(q.submit("b", 3), Ok(Submitted::New));
        assert_eq!(q.submit("c", 4), Err(QueueFull(3)));
        assert_eq!(q.submit("a", 5), Err(QueueFull(3)), "joining counts too");
        assert_eq!(QueueFull(3).to_string(), "queue full: 3 lookups waiting");
        assert_eq!(q.next(), Some("a"));
        // Running, but still joinable until finished.
        assert_eq!(q.finish(&"a"), vec![1, 2]);
        assert_eq!(q.waiting(), 3, "waiting until answered");
        assert!(!q.answered(2));
        assert_eq!(q.waiting(), 1);
        assert_eq!(q.submit("a", 6), Ok(Submitted::New));
        assert_eq!(q.next(), Some("b"));
        assert_eq!(q.finish(&"b"), vec![3]);
        assert!(!q.answered(1));
        assert_eq!(q.next(), Some("a"));
        assert_eq!(q.finish(&"a"), vec![6]);
        assert!(!q.wait_idle(Duration::ZERO), "not answered yet");
        assert!(q.answered(1));
        assert!(q.wait_idle(Duration::ZERO));
    }

    #[test]
    fn stop_wakes_workers_and_hands_back_the_waiting() {
        let q: Arc<Queue<u32, u32>> = Arc::new(Queue::new(10));
        let idle_worker = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.next())
        };
        assert_eq!(q.submit(1, 10), Ok(Submitted::New));
        assert_eq!(q.submit(1, 11), Ok(Submitted::Joined));
        assert_eq!(idle_worker.join().unwrap(), Some(1), "a waiting worker is woken");
        assert_eq!(q.submit(2, 20), Ok(Submitted::New));
        assert!(!q.wait_idle(Duration::from_millis(10)));
        let blocked = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                // Takes 2, then waits for more until stopped.
                let first = q.next();
                (first, q.next())
            })
        };
        while !q.lock().pending.is_empty() {
            std::thread::yield_now();
        }
        let mut left = q.stop();
        left.sort_unstable();
        assert_eq!(left, [10, 11, 20]);
        assert_eq!(blocked.join().unwrap(), (Some(2), None));
        assert_eq!(q.next(), None);
        assert!(q.wait_idle(Duration::ZERO));
    }
}
