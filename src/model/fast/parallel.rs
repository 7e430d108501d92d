//! How the fast engine shares work between threads: a barrier cheap enough to separate every
//! layer of a single image, and the two ways of running an image (alone, or as a team that
//! splits each layer's output rows).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Busy-wait iterations before a waiting thread goes to sleep: about 50 microseconds (a
/// `spin_loop` hint takes some 45 ns on the Zen 4 this was tuned on). A layer of one image takes
/// tens of microseconds, so on an idle machine the partner usually arrives while we spin; on a
/// busy one the partner may be descheduled, and sleeping hands it our core instead of burning it.
const SPINS_BEFORE_SLEEP: u32 = 1_000;

/// A reusable barrier for a fixed number of threads: spins first, then sleeps on a condvar.
#[derive(Debug)]
pub struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// Threads that gave up spinning and sleep (or are about to) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// A thread of the team panicked and will never arrive.
    broken: AtomicBool,
}

impl SpinBarrier {
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    /// Releases every waiter, now and later, with a panic: called when a thread of the team
    /// panics, so that the others do not wait for it forever.
    pub fn break_barrier(&self) {
        self.broken.store(true, Ordering::SeqCst);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }

    fn check_broken(&self) {
        if self.broken.load(Ordering::Relaxed) {
            panic!("another thread of the team panicked");
        }
    }

    /// Returns once all threads have called `wait`; everything each of them wrote before the call
    /// is visible to all of them after it.
    ///
    /// Panics when the barrier is broken (another thread panicked).
    pub fn wait(&self) {
        self.check_broken();
        let generation = self.generation.load(Ordering::Acquire);
        // AcqRel: the last arriver acquires every earlier arriver's writes through this counter,
        // then publishes them (and its own) with the increment of `generation`.
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            // SeqCst pairs with the sleeper's SeqCst increment below: either the sleeper sees
            // the new generation, or we see the sleeper and wake it.
            self.generation.fetch_add(1, Ordering::SeqCst);
            if self.sleepers.load(Ordering::SeqCst) > 0 {
                let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                self.wake.notify_all();
            }
            return;
        }
        for _ in 0..SPINS_BEFORE_SLEEP {
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            std::hint::spin_loop();
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.generation.load(Ordering::SeqCst) == generation
            && !self.broken.load(Ordering::SeqCst)
        {
            guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        self.check_broken();
    }
}

/// Breaks the barrier if dropped while its thread unwinds from a panic.
#[derive(Debug)]
pub struct BreakOnPanic<'a>(pub &'a SpinBarrier);

impl Drop for BreakOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.break_barrier();
        }
    }
}

/// Which output rows of a layer the calling thread computes, and how it waits for the others.
///
/// # Safety
/// The network writes shared buffers from several threads on the strength of this trait, so an
/// implementation must guarantee, for the threads that share one partition (one value per
/// thread): `rows(n)` gives the threads disjoint ranges within `0..n` that together cover it;
/// `sync` returns only after every thread of the partition has called it, and everything a
/// thread wrote before its call is visible to all of them after; exactly one thread is the
/// leader.
pub unsafe trait Partition {
    /// This thread's share of `n` rows.
    fn rows(&self, n: usize) -> Range<usize>;
    /// Waits until every thread of the partition has finished the current layer.
    fn sync(&self);
    /// Whether this thread does the work that is not split (the classifier head).
    fn is_leader(&self) -> bool;
}

/// One thread runs the whole image.
#[derive(Debug, Clone, Copy)]
pub struct Alone;

// SAFETY: a partition of one thread: all rows, nobody to wait for, the leader.
unsafe impl Partition for Alone {
    fn rows(&self, n: usize) -> Range<usize> {
        0..n
    }
    fn sync(&self) {}
    fn is_leader(&self) -> bool {
        true
    }
}

/// Thread `index` of `barrier`'s threads, each computing a contiguous band of every layer's rows.
#[derive(Debug, Clone, Copy)]
pub struct Team<'a> {
    index: usize,
    barrier: &'a SpinBarrier,
}

impl<'a> Team<'a> {
    /// # Safety
    /// Each of the indices `0..threads` of `barrier` is used by exactly one thread, so that the
    /// team's bands are disjoint and its barrier counts every member once.
    pub unsafe fn new(index: usize, barrier: &'a SpinBarrier) -> Self {
        Self { index, barrier }
    }
}

// SAFETY: the bands `n * index / size .. n * (index + 1) / size` for index 0..size are
// contiguous, disjoint and cover 0..n (tested below); `SpinBarrier::wait` returns once all `size`
// threads have arrived, with acquire/release ordering on its counters; index 0 leads. The
// indices of one barrier's team are distinct by construction (`FastResNet::run`).
unsafe impl Partition for Team<'_> {
    fn rows(&self, n: usize) -> Range<usize> {
        let size = self.barrier.threads;
        n * self.index / size..n * (self.index + 1) / size
    }
    fn sync(&self) {
        self.barrier.wait();
    }
    fn is_leader(&self) -> bool {
        self.index == 0
    }
}

/// Shortest and longest run of calls between two tries of the mode that currently looks slower.
const MIN_EXPLORE_INTERVAL: u64 = 8;
const MAX_EXPLORE_INTERVAL: u64 = 1024;
/// Weight of the newest measurement in the running average.
const EMA_WEIGHT: f64 = 0.3;

/// Learns from wall times whether images that cannot go one per thread (a batch smaller than
/// the thread count) run faster with every layer split between threads or on one thread.
///
/// Splitting layers needs all threads at each of the ~56 barriers of an image: on an idle
/// machine that nearly divides the latency by the thread count, but when other processes keep
/// the cores busy every barrier waits for a descheduled partner and it is many times slower than
/// one thread. Which holds changes with the machine's load, so it is measured, not assumed: the
/// faster mode is used, the other retried now and then (less often while it keeps losing).
#[derive(Debug, Clone)]
pub struct TeamChooser {
    team: Option<f64>,
    alone: Option<f64>,
    calls: u64,
    next_try: u64,
    interval: u64,
    /// The last choice was a retry of the slower mode, whose average is stale.
    exploring: bool,
}

impl Default for TeamChooser {
    fn default() -> Self {
        Self {
            team: None,
            alone: None,
            exploring: false,
            calls: 0,
            next_try: MIN_EXPLORE_INTERVAL,
            interval: MIN_EXPLORE_INTERVAL,
        }
    }
}

impl TeamChooser {
    fn team_is_faster(&self) -> Option<bool> {
        Some(self.team? <= self.alone?)
    }

    /// The mode that currently looks faster (the team until measured otherwise).
    pub fn prefers_team(&self) -> bool {
        self.team_is_faster().unwrap_or(true)
    }

    /// Whether the next call should split its layers between threads.
    pub fn choose(&mut self) -> bool {
        self.calls += 1;
        self.exploring = false;
        match (self.team, self.alone, self.team_is_faster()) {
            (None, ..) => true,
            (_, None, _) => false,
            (.., Some(team_faster)) if self.calls >= self.next_try => {
                self.next_try = self.calls + self.interval;
                self.interval = (2 * self.interval).min(MAX_EXPLORE_INTERVAL);
                self.exploring = true;
                !team_faster
            }
            (.., team_faster) => team_faster.unwrap_or(true),
        }
    }

    /// Records how long a call took per image in the mode it used.
    pub fn record(&mut self, team: bool, seconds_per_image: f64) {
        let before = self.team_is_faster();
        let average = if team {
            &mut self.team
        } else {
            &mut self.alone
        };
        *average = Some(match *average {
            Some(old) if !self.exploring => old + EMA_WEIGHT * (seconds_per_image - old),
            _ => seconds_per_image,
        });
        if before.is_some() && before != self.team_is_faster() {
            // The machine changed: look again soon.
            self.interval = MIN_EXPLORE_INTERVAL;
            self.next_try = self.calls + MIN_EXPLORE_INTERVAL;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates calls whose per-image time is `team_s` or `alone_s`; returns the modes used.
    fn drive(chooser: &mut TeamChooser, calls: usize, team_s: f64, alone_s: f64) -> Vec<bool> {
        (0..calls)
            .map(|_| {
                let team = chooser.choose();
                chooser.record(team, if team { team_s } else { alone_s });
                team
            })
            .collect()
    }

    #[test]
    fn chooser_settles_on_the_faster_mode_and_keeps_checking_the_other() {
        let mut chooser = TeamChooser::default();
        // Busy machine: the team is eight times slower.
        let modes = drive(&mut chooser, 2000, 8e-3, 1e-3);
        assert!(modes[0], "tries the team first");
        assert!(!modes[1], "then one thread");
        let team_calls = modes.iter().filter(|&&t| t).count();
        assert!((2..=12).contains(&team_calls), "{team_calls} team calls");
        // The machine goes idle: the team becomes twice as fast and is adopted.
        let modes = drive(&mut chooser, 3000, 0.5e-3, 1e-3);
        let late_team = modes[1500..].iter().filter(|&&t| t).count();
        assert!(
            late_team > 1490,
            "{late_team} of the last 1500 calls used the team"
        );
    }

    #[test]
    fn team_bands_cover_every_row_once() {
        let barrier = SpinBarrier::new(3);
        for n in [0, 1, 2, 8, 17, 32] {
            let mut next = 0;
            for index in 0..3 {
                let rows = Team {
                    index,
                    barrier: &barrier,
                }
                .rows(n);
                assert_eq!(rows.start, next);
                next = rows.end;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn a_panicking_thread_releases_its_team() {
        let barrier = SpinBarrier::new(2);
        let result = std::panic::catch_unwind(|| {
            std::thread::scope(|s| {
                s.spawn(|| barrier.wait());
                let _guard = BreakOnPanic(&barrier);
                panic!("a bug in one thread");
            })
        });
        assert!(result.is_err());
    }

    #[test]
    fn barrier_orders_phases_across_threads() {
        let threads = 3;
        let barrier = SpinBarrier::new(threads);
        let counter = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for phase in 0..200 {
                        counter.fetch_add(1, Ordering::Relaxed);
                        barrier.wait();
                        // Everyone has incremented for this phase, nobody for the next one yet.
                        assert_eq!(counter.load(Ordering::Relaxed), (phase + 1) * threads);
                        barrier.wait();
                    }
                });
            }
        });
    }
}
