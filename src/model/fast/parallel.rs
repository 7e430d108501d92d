//! How the fast engine shares work between threads: a barrier cheap enough to separate every
//! layer of a single image, and the two ways of running an image (alone, or as a team that
//! splits each layer's output rows).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Busy-wait iterations (about 20-50 microseconds) before a waiting thread goes to sleep. A
/// layer of one image takes tens of microseconds, so on an idle machine the partner usually
/// arrives while we spin; on a busy one the partner may be descheduled, and sleeping hands it
/// our core instead of burning it.
const SPINS_BEFORE_SLEEP: u32 = 10_000;

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
        }
    }

    /// Returns once all threads have called `wait`; everything each of them wrote before the call
    /// is visible to all of them after it.
    pub fn wait(&self) {
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
        while self.generation.load(Ordering::SeqCst) == generation {
            guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which output rows of a layer the calling thread computes, and how it waits for the others.
pub trait Partition {
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

impl Partition for Alone {
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
    pub index: usize,
    pub barrier: &'a SpinBarrier,
}

impl Partition for Team<'_> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
