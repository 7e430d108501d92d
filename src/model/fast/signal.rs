//! Waiting for a condition that another thread makes true: poll it briefly (and, if asked,
//! stay awake a while longer, yielding the core), then sleep until that thread, having made it
//! true, wakes the sleepers. The engine's helpers (for the next job), its caller (for the
//! helpers to finish) and a team's members (for rows to be finished) all wait this way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where threads sleep until a condition holds. A condition that comes true while the waiter
/// polls costs no sleep and no lock; a notifier takes the lock only when someone sleeps.
#[derive(Debug, Default)]
pub struct Signal {
    /// Threads asleep on `wake`, or about to be.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Signal {
    /// Returns once `ready()` is true: polls it `polls` times, then sleeps until a
    /// [`Self::notify`] finds it true.
    ///
    /// `ready` must read with `SeqCst` what the notifier writes with `SeqCst` before calling
    /// `notify`. Then no wake-up is lost: either our check after registering as a sleeper sees
    /// the write, or the notifier's check sees us registered and wakes us, under the lock, so not
    /// before we wait.
    pub fn wait_until(&self, polls: u32, ready: impl Fn() -> bool) {
        self.wait_until_awake(polls, Duration::ZERO, ready);
    }

    /// [`Self::wait_until`], staying awake for up to `awake` after the polls: checking `ready()`
    /// between yields of the core to any other thread that wants it, so that the waiter's core
    /// does not go idle, nor keep another thread waiting.
    pub fn wait_until_awake(&self, polls: u32, awake: Duration, ready: impl Fn() -> bool) {
        for _ in 0..polls {
            if ready() {
                return;
            }
            std::hint::spin_loop();
        }
        if !awake.is_zero() {
            let until = Instant::now() + awake;
            while Instant::now() < until {
                if ready() {
                    return;
                }
                std::thread::yield_now();
            }
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while !ready() {
            guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes the sleepers; call after the `SeqCst` write that may make their condition true.
    pub fn notify(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;

    type Shared = Arc<(Signal, AtomicBool)>;

    /// A thread that waits (`polls`, then `awake`) until the flag is set; the receiver hears
    /// when it returns.
    fn waiter(shared: &Shared, polls: u32, awake: Duration) -> mpsc::Receiver<()> {
        let (returned, waiter_returned) = mpsc::channel();
        let shared = Arc::clone(shared);
        std::thread::spawn(move || {
            let (signal, flag) = &*shared;
            signal.wait_until_awake(polls, awake, || flag.load(Ordering::SeqCst));
            let _ = returned.send(());
        });
        waiter_returned
    }

    #[test]
    fn a_sleeping_waiter_is_woken_by_the_write_that_makes_its_condition_true() {
        for polls in [0, 1_000] {
            let shared = Arc::new((Signal::default(), AtomicBool::new(false)));
            let waiter_returned = waiter(&shared, polls, Duration::ZERO);
            // Long enough for the waiter to be asleep.
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                waiter_returned.try_recv().is_err(),
                "returned before the write"
            );
            let (signal, flag) = &*shared;
            flag.store(true, Ordering::SeqCst);
            signal.notify();
            // A lost wake-up fails here instead of hanging the test.
            waiter_returned
                .recv_timeout(Duration::from_secs(10))
                .expect("the waiter is woken");
        }
    }

    #[test]
    fn a_waiter_staying_awake_sees_the_write_without_a_notify_then_sleeps() {
        let shared = Arc::new((Signal::default(), AtomicBool::new(false)));
        let waiter_returned = waiter(&shared, 0, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            waiter_returned.try_recv().is_err(),
            "returned before the write"
        );
        let (signal, flag) = &*shared;
        assert_eq!(
            signal.sleepers.load(Ordering::SeqCst),
            0,
            "asleep while awake"
        );
        flag.store(true, Ordering::SeqCst);
        waiter_returned
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiter saw the write while awake");

        // Awake for 1 ms, then asleep: only a notify wakes it.
        flag.store(false, Ordering::SeqCst);
        let waiter_returned = waiter(&shared, 0, Duration::from_millis(1));
        let asleep_by = Instant::now() + Duration::from_secs(10);
        while signal.sleepers.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < asleep_by, "never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        flag.store(true, Ordering::SeqCst);
        signal.notify();
        waiter_returned
            .recv_timeout(Duration::from_secs(10))
            .expect("the sleeper is woken");
    }
}
