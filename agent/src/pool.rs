//! A pool of threads for the agent's connections and blocking requests.
//!
//! Making a thread costs the guest kernel a dozen system calls (its stack's
//! mmap and guard, clone3, its exit's munmap...), each emulated on PVM
//! hosts; a connection or a blocking request used to cost one. Workers
//! wait for jobs instead of exiting, and the agent starts a few before it
//! reports ready, so a VM restored from a template has them already. A job
//! that leaves its thread in a state unfit for other jobs (see
//! [`retire_current`]) ends the thread afterwards.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send>;

struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers alive.
    live: usize,
}

struct Inner {
    name: &'static str,
    /// Idle workers beyond this many exit.
    keep: usize,
    state: Mutex<State>,
    wake: Condvar,
}

/// A growing pool of worker threads.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

thread_local! {
    static RETIRE: Cell<bool> = const { Cell::new(false) };
}

/// Ends the calling worker once its job returns (the job changed the
/// thread in a way that later jobs must not inherit).
pub fn retire_current() {
    RETIRE.with(|r| r.set(true));
}

impl Pool {
    /// A pool whose threads are named `name`, keeping at most `keep` idle
    /// threads.
    pub fn new(name: &'static str, keep: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                keep,
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    idle: 0,
                    live: 0,
                }),
                wake: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `n` idle workers.
    pub fn prestart(&self, n: usize) -> std::io::Result<()> {
        for _ in 0..n {
            self.spawn_worker()?;
        }
        Ok(())
    }

    /// Runs `job` on a worker: an idle one, else a new one. A job never
    /// waits for another to finish.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut st = self.lock();
        st.jobs.push_back(Box::new(job));
        let spawn = st.jobs.len() > st.idle;
        drop(st);
        self.inner.wake.notify_one();
        if spawn {
            if let Err(e) = self.spawn_worker() {
                // Nobody will take it: run nothing rather than leave it queued.
                self.lock().jobs.pop_back();
                return Err(e);
            }
        }
        Ok(())
    }

    fn spawn_worker(&self) -> std::io::Result<()> {
        let pool = self.clone();
        self.lock().live += 1;
        let spawned = std::thread::Builder::new()
            .name(self.inner.name.into())
            .spawn(move || {
                pool.work();
                pool.lock().live -= 1;
            });
        if spawned.is_err() {
            self.lock().live -= 1;
        }
        spawned.map(drop)
    }

    fn work(&self) {
        loop {
            let mut st = self.lock();
            let job = loop {
                if let Some(job) = st.jobs.pop_front() {
                    break job;
                }
                if st.idle >= self.inner.keep {
                    return;
                }
                st.idle += 1;
                st = self.inner.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle -= 1;
            };
            drop(st);
            job();
            if RETIRE.with(Cell::get) {
                return;
            }
        }
    }

    /// Idle and live workers now (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.idle, st.live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Waits until `n` workers live, all idle.
    fn settle(pool: &Pool, n: usize) {
        for _ in 0..1000 {
            if pool.counts() == (n, n) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "(idle, live) workers {:?}, wanted {n} of each",
            pool.counts()
        );
    }

    #[test]
    fn jobs_reuse_idle_threads_and_never_wait_for_each_other() {
        let pool = Pool::new("test", 4);
        pool.prestart(2).unwrap();
        settle(&pool, 2);
        // Two jobs that block until released, and a third that must run
        // meanwhile (on a new thread).
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel();
        let mut threads = Vec::new();
        for i in 0..3 {
            let (rx, tx) = (release_rx.clone(), done_tx.clone());
            pool.run(move || {
                tx.send((i, std::thread::current().id())).unwrap();
                if i < 2 {
                    let _ = rx.lock().unwrap().recv();
                }
            })
            .unwrap();
        }
        for _ in 0..3 {
            threads.push(done_rx.recv_timeout(Duration::from_secs(5)).unwrap());
        }
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        // All three back idle; a later job reuses one of their threads.
        settle(&pool, 3);
        let (tx, rx) = mpsc::channel();
        pool.run(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap();
        let reused = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(threads.iter().any(|(_, t)| *t == reused));
    }

    #[test]
    fn idle_threads_beyond_the_limit_exit_and_retired_ones_too() {
        let pool = Pool::new("test", 1);
        pool.prestart(3).unwrap();
        settle(&pool, 1);
        let (tx, rx) = mpsc::channel();
        pool.run(move || {
            retire_current();
            tx.send(()).unwrap();
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The retired worker does not come back: a new job gets a new one.
        settle(&pool, 0);
        let (tx, rx) = mpsc::channel();
        pool.run(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        settle(&pool, 1);
    }
}
