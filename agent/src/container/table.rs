//! The container table and the order of requests on one container.
//!
//! Requests on one container are ordered, never refused for timing:
//! - a *change* (create, start, pause, resume, update, delete) has the
//!   container to itself while it runs: it waits for the change before it
//!   and for the requests that share the container (execs) to finish;
//! - a *shared* request (exec, signal, state, pids, stats) waits for a
//!   change in progress or waiting, then acts on the state it left; several
//!   run at once;
//! - a *peek* (the OOM watch) reads the state as it is, waiting for nobody
//!   and delaying nobody.
//!
//! A waiting request gives up at its deadline with `TimedOut`; a request
//! that waited for a delete finds the container gone (`NoSuchContainer`).
//! Changes that wait hold back new shared requests, so a stream of execs
//! cannot starve a delete.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtv_protocol::ErrorKind;

use crate::process::Failure;

/// How long a request may wait for other requests on its container.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Self {
            at: Instant::now() + limit,
            limit,
        }
    }

    fn left(&self) -> Option<Duration> {
        self.at
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    fn timed_out(&self, id: &str, doing: &str) -> Failure {
        Failure::new(
            ErrorKind::TimedOut,
            format!(
                "container {id:?}: waited {:.1} s for another request that is still {doing} it",
                self.limit.as_secs_f64()
            ),
        )
    }
}

/// The failure for an unknown (or deleted) container.
pub fn no_such(id: &str) -> Failure {
    Failure::new(
        ErrorKind::NoSuchContainer,
        format!("container {id:?} does not exist"),
    )
}

fn relock<G>(r: std::sync::LockResult<G>) -> G {
    r.unwrap_or_else(|p| p.into_inner())
}

struct Turns<S> {
    /// The change in progress, as "<verb>ing" for messages.
    change: Option<&'static str>,
    /// Changes waiting for their turn.
    changes_waiting: u32,
    /// Shared requests in progress that do not hold the lock (execs).
    sharers: u32,
    /// Deleted: whoever waited finds the container gone.
    gone: bool,
    state: S,
}

type Locked<'a, S> = MutexGuard<'a, Turns<S>>;

/// One container: `fixed` never changes after create; `S` is its state,
/// reached through the ordering rules of this module.
pub struct Entry<C, S> {
    id: String,
    /// What never changes once the container exists.
    pub fixed: C,
    turns: Mutex<Turns<S>>,
    turn: Condvar,
}

/// The locked state of a container.
pub struct StateGuard<'a, S>(MutexGuard<'a, Turns<S>>);

impl<S> Deref for StateGuard<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0.state
    }
}

impl<S> DerefMut for StateGuard<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0.state
    }
}

impl<C, S> Entry<C, S> {
    /// A new container `id`.
    pub fn new(id: &str, fixed: C, state: S) -> Self {
        Self {
            id: id.to_owned(),
            fixed,
            turns: Mutex::new(Turns {
                change: None,
                changes_waiting: 0,
                sharers: 0,
                gone: false,
                state,
            }),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Turns<S>> {
        relock(self.turns.lock())
    }

    /// Waits on the condition variable until `ready` or the deadline; on
    /// failure the lock is handed back with the reason.
    fn wait_until<'a>(
        &'a self,
        mut t: Locked<'a, S>,
        deadline: Deadline,
        ready: impl Fn(&Turns<S>) -> bool,
    ) -> Result<Locked<'a, S>, (Locked<'a, S>, Failure)> {
        loop {
            if t.gone {
                return Err((t, no_such(&self.id)));
            }
            if ready(&t) {
                return Ok(t);
            }
            let Some(left) = deadline.left() else {
                let doing = t.change.unwrap_or("running an exec in");
                let f = deadline.timed_out(&self.id, doing);
                return Err((t, f));
            };
            t = relock(self.turn.wait_timeout(t, left)).0;
        }
    }

    /// The state as it is, even during a change; `NoSuchContainer` once
    /// deleted.
    pub fn peek(&self) -> Result<StateGuard<'_, S>, Failure> {
        let t = self.lock();
        if t.gone {
            return Err(no_such(&self.id));
        }
        Ok(StateGuard(t))
    }

    /// The state once no change is in progress or waiting, locked: for a
    /// request that acts at once (state, signal, stats).
    pub fn shared(&self, deadline: Deadline) -> Result<StateGuard<'_, S>, Failure> {
        let t = self.lock();
        self.wait_until(t, deadline, |t| {
            t.change.is_none() && t.changes_waiting == 0
        })
        .map(StateGuard)
        .map_err(|(_, f)| f)
    }

    /// A turn shared with other such requests, for a request that takes
    /// long without changing the container (exec): changes wait for it.
    /// `check` sees the state first; its error ends the request.
    pub fn share<T>(
        &self,
        deadline: Deadline,
        check: impl FnOnce(&mut S) -> Result<T, Failure>,
    ) -> Result<(Share<'_, C, S>, T), Failure> {
        let mut t = self.shared(deadline)?;
        let value = check(&mut t)?;
        t.0.sharers += 1;
        Ok((Share(self), value))
    }

    /// The container to itself, for a change described by `doing` ("being
    /// started", ...): waits for the change before it and for shared turns.
    pub fn change(
        &self,
        doing: &'static str,
        deadline: Deadline,
    ) -> Result<Change<'_, C, S>, Failure> {
        let mut t = self.lock();
        t.changes_waiting += 1;
        let waited = self.wait_until(t, deadline, |t| t.change.is_none() && t.sharers == 0);
        let mut t = match waited {
            Ok(t) => t,
            Err((mut t, f)) => {
                t.changes_waiting -= 1;
                drop(t);
                // Shared requests held back for this change may go on.
                self.turn.notify_all();
                return Err(f);
            }
        };
        t.changes_waiting -= 1;
        t.change = Some(doing);
        Ok(Change {
            entry: self,
            gone: false,
        })
    }
}

/// A shared turn ([`Entry::share`]); ends when dropped.
pub struct Share<'a, C, S>(&'a Entry<C, S>);

impl<C, S> Drop for Share<'_, C, S> {
    fn drop(&mut self) {
        self.0.lock().sharers -= 1;
        self.0.turn.notify_all();
    }
}

/// A change in progress ([`Entry::change`]); ends when dropped.
pub struct Change<'a, C, S> {
    entry: &'a Entry<C, S>,
    gone: bool,
}

impl<C, S> Change<'_, C, S> {
    /// The state, locked for a moment (other requests only peek meanwhile).
    pub fn state(&self) -> StateGuard<'_, S> {
        StateGuard(self.entry.lock())
    }

    /// Marks the container deleted when the change ends.
    pub fn delete(&mut self) {
        self.gone = true;
    }
}

impl<C, S> Drop for Change<'_, C, S> {
    fn drop(&mut self) {
        let mut t = self.entry.lock();
        t.change = None;
        t.gone |= self.gone;
        drop(t);
        self.entry.turn.notify_all();
    }
}

enum Slot<C, S> {
    /// Being created: the id is taken, requests wait.
    Creating,
    Ready(Arc<Entry<C, S>>),
}

/// Every container, by id.
pub struct Table<C, S> {
    slots: Mutex<HashMap<String, Slot<C, S>>>,
    created: Condvar,
}

impl<C, S> Default for Table<C, S> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            created: Condvar::new(),
        }
    }
}

impl<C, S> Table<C, S> {
    /// Takes `id` for a create; `AlreadyExists` if it is taken.
    pub fn reserve(&self, id: &str) -> Result<(), Failure> {
        let mut slots = relock(self.slots.lock());
        if slots.contains_key(id) {
            return Err(Failure::new(
                ErrorKind::AlreadyExists,
                format!("container {id:?} already exists"),
            ));
        }
        slots.insert(id.to_owned(), Slot::Creating);
        Ok(())
    }

    /// Ends the create of `id`: the container, or nothing if it failed.
    pub fn created(&self, id: &str, entry: Option<Arc<Entry<C, S>>>) {
        let mut slots = relock(self.slots.lock());
        match entry {
            Some(e) => slots.insert(id.to_owned(), Slot::Ready(e)),
            None => slots.remove(id),
        };
        drop(slots);
        self.created.notify_all();
    }

    /// Container `id`, once created (waiting for a create in progress).
    pub fn get(&self, id: &str, deadline: Deadline) -> Result<Arc<Entry<C, S>>, Failure> {
        let mut slots = relock(self.slots.lock());
        loop {
            match slots.get(id) {
                None => return Err(no_such(id)),
                Some(Slot::Ready(e)) => return Ok(e.clone()),
                Some(Slot::Creating) => {
                    let Some(left) = deadline.left() else {
                        return Err(deadline.timed_out(id, "creating"));
                    };
                    slots = relock(self.created.wait_timeout(slots, left)).0;
                }
            }
        }
    }

    /// Container `id` without waiting: `None` while it is being created.
    pub fn try_get(&self, id: &str) -> Result<Option<Arc<Entry<C, S>>>, Failure> {
        match relock(self.slots.lock()).get(id) {
            None => Err(no_such(id)),
            Some(Slot::Creating) => Ok(None),
            Some(Slot::Ready(e)) => Ok(Some(e.clone())),
        }
    }

    /// Forgets `entry` (deleted) under its id.
    pub fn remove(&self, entry: &Arc<Entry<C, S>>) {
        let mut slots = relock(self.slots.lock());
        if matches!(slots.get(&entry.id), Some(Slot::Ready(e)) if Arc::ptr_eq(e, entry)) {
            slots.remove(&entry.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread;

    fn long() -> Deadline {
        Deadline::after(Duration::from_secs(10))
    }

    fn entry() -> Arc<Entry<(), u32>> {
        Arc::new(Entry::new("c", (), 0))
    }

    #[test]
    fn shared_requests_wait_for_a_change_and_see_its_result() {
        let e = entry();
        let change = e.change("being started", long()).unwrap();
        let reader = {
            let e = e.clone();
            thread::spawn(move || *e.shared(long()).unwrap())
        };
        thread::sleep(Duration::from_millis(50));
        *change.state() = 7;
        drop(change);
        assert_eq!(reader.join().unwrap(), 7);
    }

    #[test]
    fn peek_does_not_wait_for_a_change() {
        let e = entry();
        let change = e.change("being started", long()).unwrap();
        *change.state() = 3;
        assert_eq!(*e.peek().unwrap(), 3);
        drop(change);
    }

    #[test]
    fn a_change_waits_for_shared_turns_and_holds_back_new_ones() {
        let e = entry();
        let (turn, ()) = e.share(long(), |_| Ok(())).unwrap();
        let order = Arc::new(AtomicU32::new(0));
        let changer = {
            let (e, order) = (e.clone(), order.clone());
            thread::spawn(move || {
                let c = e.change("being paused", long()).unwrap();
                *c.state() = 1 + order.fetch_add(1, Ordering::SeqCst);
            })
        };
        thread::sleep(Duration::from_millis(50));
        // The change waits; a new shared request queues behind it.
        let late = {
            let (e, order) = (e.clone(), order.clone());
            thread::spawn(move || {
                let s = e.shared(long()).unwrap();
                order.fetch_add(1, Ordering::SeqCst);
                *s
            })
        };
        thread::sleep(Duration::from_millis(50));
        assert_eq!(order.load(Ordering::SeqCst), 0);
        drop(turn);
        changer.join().unwrap();
        assert_eq!(late.join().unwrap(), 1, "the shared request saw the change");
    }

    #[test]
    fn waiting_past_the_deadline_is_timed_out_not_invalid_state() {
        let e = entry();
        let change = e.change("being deleted", long()).unwrap();
        let short = Deadline::after(Duration::from_millis(30));
        let f = e.shared(short).err().unwrap();
        assert_eq!(f.kind, ErrorKind::TimedOut);
        assert!(f.message.contains("being deleted"), "{}", f.message);
        let f = e.change("being paused", short).err().unwrap();
        assert_eq!(f.kind, ErrorKind::TimedOut);
        drop(change);
        // The timed-out change no longer holds shared requests back.
        assert_eq!(*e.shared(short).unwrap(), 0);
    }

    #[test]
    fn requests_that_waited_for_a_delete_find_no_container() {
        let e = entry();
        let mut change = e.change("being deleted", long()).unwrap();
        let waiter = {
            let e = e.clone();
            thread::spawn(move || e.shared(long()).err().map(|f| f.kind))
        };
        thread::sleep(Duration::from_millis(50));
        change.delete();
        drop(change);
        assert_eq!(waiter.join().unwrap(), Some(ErrorKind::NoSuchContainer));
        assert_eq!(e.peek().err().unwrap().kind, ErrorKind::NoSuchContainer);
    }

    #[test]
    fn the_table_waits_for_a_create() {
        let t: Arc<Table<(), u32>> = Arc::default();
        t.reserve("a").unwrap();
        assert_eq!(t.reserve("a").unwrap_err().kind, ErrorKind::AlreadyExists);
        assert!(t.try_get("a").unwrap().is_none());
        let getter = {
            let t = t.clone();
            thread::spawn(move || t.get("a", long()).map(|e| *e.peek().unwrap()))
        };
        thread::sleep(Duration::from_millis(50));
        t.created("a", Some(Arc::new(Entry::new("a", (), 5))));
        assert_eq!(getter.join().unwrap().unwrap(), 5);
        // A failed create leaves nothing; a waiter finds no container.
        t.reserve("b").unwrap();
        let getter = {
            let t = t.clone();
            thread::spawn(move || t.get("b", long()).err().map(|f| f.kind))
        };
        thread::sleep(Duration::from_millis(50));
        t.created("b", None);
        assert_eq!(getter.join().unwrap(), Some(ErrorKind::NoSuchContainer));
        let f = t.get("a", long()).unwrap();
        t.remove(&f);
        assert_eq!(
            t.try_get("a").err().unwrap().kind,
            ErrorKind::NoSuchContainer
        );
    }
}
