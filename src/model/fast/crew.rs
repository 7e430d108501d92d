//! The fast engine's helper threads: started once with the engine and handed the same job on
//! every forward pass; between passes they stay awake a little while, yielding their core, then
//! sleep. A helper that has not started a pass's job by the time the caller has finished its own
//! call skips it: the engine's work is claimed, not assigned, so the caller will have done that
//! helper's share, and waiting for a helper that is slow to wake (or preempted) would only add
//! its delay to the pass.
//!
//! Why not rayon's pool, which did this before: a pass through it allocates a scope and a
//! broadcast job per thread, and its idle workers go through a few dozen `sched_yield`s before
//! they sleep; this crew posts a generation number and wakes exactly the helpers that sleep.
//! Measured at one client (`/classify` under wrk, 2 threads, 3 rounds, medians): 1.11x the
//! requests per second of the rayon pool, p99 3.14 ms against 3.83 ms.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::signal::Signal;

/// Polls before a waiting thread (a helper between passes, the caller at the end of one) sleeps
/// or, for a helper, yields (see [`AWAKE_AFTER_JOB`]): a microsecond or two. Polling longer, as
/// OpenMP runtimes do between parallel regions (`KMP_BLOCKTIME`), was measured and rejected: at
/// one client on 2 cores, 1 ms of polling after each pass left the p99 at 7.3 ms against 3.1 ms
/// (medians of 3 runs) for no gain that held up, and on a server with a CPU quota it spends the
/// quota while idle; it holds the core that the runtime needs to answer. Nor does waking
/// the helpers when a request is queued for an idle engine, to poll until its pass is posted
/// (measured with alternated servers under wrk, 2 threads): at 64 clients 0.94x the requests/s
/// (faster in 2 of 10 rounds) and 1.07x the CPU per request, since a helper polling there takes a
/// core from the runtime, and at one client 0.95x to 1.03x in two runs, within their noise.
const POLLS_BEFORE_SLEEP: u32 = 64;

/// How long a helper stays awake after a job, yielding its core to any thread that wants it,
/// before it sleeps. A helper that slept between passes made the next pass about 0.2 ms slower
/// on the 2-vCPU virtual machine measured (`examples/idle_gaps.rs`): one-image passes back to
/// back took 0.63 ms (p50), with 0.1-0.3 ms pauses between them 0.75-0.91 ms, and 0.62-0.64 ms
/// when the helper polled through the pauses. Yielding keeps the core from going idle without
/// holding it: at one client (`/classify` under wrk, 2 engine threads, three alternated runs)
/// 200 us gave 1.22-1.31x the requests/s of sleeping at once, p50 0.73 ms against 0.93 ms, at
/// about the same CPU per request; 100 us gave 1.06-1.20x, 400 us about what 200 did. Only a
/// helper waits this way: the caller's own wait at the end of a pass is a few microseconds.
const AWAKE_AFTER_JOB: Duration = Duration::from_micros(200);

/// Bits of [`State::posted`] that count the seats left (more than [`super::MAX_THREADS`]).
const SEAT_BITS: u32 = 16;
const SEATS: u64 = (1 << SEAT_BITS) - 1;
const _: () = assert!(super::MAX_THREADS as u64 <= SEATS);

/// What the threads of a pass run, with their index (0 = the caller).
pub type Job<'a> = dyn Fn(usize) + Sync + 'a;

/// Threads that run a job beside the caller's, at most one call each per [`Crew::run`].
#[derive(Debug)]
pub struct Crew {
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct State {
    /// Generation of the posted job (bumped after `job` is set, to hand the helpers the job,
    /// and once more to stop them) in the high bits, above the number of helpers that may still
    /// start it ([`SEAT_BITS`] bits): each helper takes a seat before it starts the job, and
    /// the caller takes the seats left when its own call returns.
    posted: AtomicU64,
    /// Points at the caller's `&Job` while a job runs; see [`Crew::run`] for why it stays valid.
    job: AtomicPtr<&'static Job<'static>>,
    /// Helpers that have not finished the current job, less those that will not start it.
    running: AtomicUsize,
    stop: AtomicBool,
    /// The first panic of a helper in the current job, resumed by the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Where helpers wait for a job.
    jobs: Signal,
    /// Where the caller waits for the helpers to finish.
    done: Signal,
}

impl State {
    /// A helper's wait for a generation after `seen`: a few polls, awake a while, then asleep.
    fn next_job(&self, seen: u64) -> u64 {
        // SeqCst pairs with `post`'s store (see `Signal`).
        let posted = || self.posted.load(Ordering::SeqCst) >> SEAT_BITS;
        self.jobs
            .wait_until_awake(POLLS_BEFORE_SLEEP, AWAKE_AFTER_JOB, || posted() != seen);
        posted()
    }

    /// Publishes the next generation with `seats` helpers allowed to start it, and wakes the
    /// helpers that sleep. Only the caller posts, and only when no seat is left.
    fn post(&self, seats: usize) {
        let generation = (self.posted.load(Ordering::Relaxed) >> SEAT_BITS) + 1;
        self.posted
            .store((generation << SEAT_BITS) | seats as u64, Ordering::SeqCst);
        self.jobs.notify();
    }

    /// A helper's seat for the job of `generation`: false when that job is no longer open
    /// (the caller finished it, or posted the next one).
    fn take_seat(&self, generation: u64) -> bool {
        let mut current = self.posted.load(Ordering::Acquire);
        while current >> SEAT_BITS == generation && current & SEATS > 0 {
            // Acquire: the job pointer stored before the post is visible after the seat.
            match self.posted.compare_exchange_weak(
                current,
                current - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
        false
    }

    /// Takes the seats left: the helpers that have not started the job will not.
    fn close(&self) {
        let left = self.posted.fetch_and(!SEATS, Ordering::AcqRel) & SEATS;
        // Those helpers will never call `finished`.
        self.running.fetch_sub(left as usize, Ordering::SeqCst);
    }

    /// A helper is done with the current job; the last one wakes the caller if it sleeps.
    fn finished(&self) {
        // SeqCst pairs with `wait_for_helpers` (see `Signal`).
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.done.notify();
        }
    }

    /// The caller's wait until every helper has finished the current job.
    fn wait_for_helpers(&self) {
        self.done.wait_until(POLLS_BEFORE_SLEEP, || {
            self.running.load(Ordering::SeqCst) == 0
        });
    }
}

impl Crew {
    /// Starts `helpers` threads named `fast-engine-1` onwards.
    pub fn new(helpers: usize) -> std::io::Result<Self> {
        let state = Arc::new(State {
            posted: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            running: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
            jobs: Signal::default(),
            done: Signal::default(),
        });
        let mut crew = Self {
            state,
            threads: Vec::with_capacity(helpers),
        };
        for index in 1..=helpers {
            let state = Arc::clone(&crew.state);
            // On error `crew` is dropped, which stops the helpers already started.
            crew.threads.push(
                std::thread::Builder::new()
                    .name(format!("fast-engine-{index}"))
                    .spawn(move || helper(&state, index))?,
            );
        }
        Ok(crew)
    }

    /// Runs `job(0)` on this thread and `job(i)` on each helper `i` (1..=helpers) that starts
    /// before `job(0)` returns, at the same time. A helper that has not started by then skips
    /// this job, so the caller's call must be able to do all the work alone. Returns when every
    /// call has returned; a panic in any call is resumed here, after all of them have returned.
    pub fn run(&mut self, job: &Job<'_>) {
        let state = &*self.state;
        let erased: *const &Job<'_> = &job;
        // The helpers read `job` through this pointer only between taking a seat for the
        // generation posted below and their `finished()`, and this function returns (or
        // unwinds) only after `close()` (no seat is taken after it) and every seated helper's
        // `finished()`: the borrow outlives every use. `&mut self` rules out a second job
        // meanwhile.
        state.job.store(erased.cast_mut().cast(), Ordering::Release);
        state.running.store(self.threads.len(), Ordering::Relaxed);
        state.post(self.threads.len());
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        state.close();
        state.wait_for_helpers();
        state.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let theirs = state.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if let Some(panic) = theirs {
            resume_unwind(panic);
        }
    }
}

/// A helper thread's life: each posted job at most once, until the crew stops.
fn helper(state: &State, index: usize) {
    let mut seen = 0;
    loop {
        seen = state.next_job(seen);
        if state.stop.load(Ordering::Acquire) {
            return;
        }
        if !state.take_seat(seen) {
            // The caller finished this job without us.
            continue;
        }
        let job = state.job.load(Ordering::Acquire).cast_const();
        // SAFETY: we hold a seat of the generation `Crew::run` posted after it stored a pointer
        // to its `&Job`, which stays valid until this helper's `finished()` below (see
        // `Crew::run`).
        let job: &Job<'_> = unsafe { *job };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| job(index))) {
            state
                .panic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(panic);
        }
        state.finished();
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.post(0);
        for thread in self.threads.drain(..) {
            // A helper never unwinds (its jobs' panics are caught), so `join` cannot fail.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_thread_runs_a_job_that_waits_for_all_of_them_once_at_the_same_time() {
        let mut crew = Crew::new(3).unwrap();
        let barrier = std::sync::Barrier::new(4);
        for round in 0..50 {
            let calls: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
            // The barrier passes only if all four calls are running together.
            crew.run(&|index| {
                calls[index].fetch_add(1, Ordering::Relaxed);
                barrier.wait();
            });
            let counts: Vec<usize> = calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            assert_eq!(counts, [1, 1, 1, 1], "round {round}");
            if round % 10 == 0 {
                // Long enough for the helpers to fall asleep: the next job must wake them.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn a_helpers_panic_reaches_the_caller_after_everyone_finished() {
        let mut crew = Crew::new(2).unwrap();
        let all_started = std::sync::Barrier::new(3);
        let finished = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            crew.run(&|index| {
                all_started.wait();
                if index == 2 {
                    panic!("helper 2 fails");
                }
                std::thread::sleep(Duration::from_millis(20));
                finished.fetch_add(1, Ordering::SeqCst);
            })
        }));
        let panic = result.expect_err("the helper's panic is resumed");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"helper 2 fails"));
        assert_eq!(
            finished.load(Ordering::SeqCst),
            2,
            "the others ran to the end"
        );
        // The crew still works.
        let calls = AtomicUsize::new(0);
        crew.run(&|_| {
            all_started.wait();
            calls.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_callers_panic_waits_for_the_helpers() {
        let mut crew = Crew::new(1).unwrap();
        let helper_started = AtomicBool::new(false);
        let helper_done = AtomicBool::new(false);
        let result = catch_unwind(AssertUnwindSafe(|| {
            crew.run(&|index| {
                if index == 0 {
                    while !helper_started.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    panic!("caller fails");
                }
                helper_started.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                helper_done.store(true, Ordering::SeqCst);
            })
        }));
        assert!(result.is_err());
        assert!(helper_done.load(Ordering::SeqCst));
    }

    #[test]
    fn helpers_that_have_not_started_when_the_caller_is_done_skip_the_job() {
        let mut crew = Crew::new(3).unwrap();
        let mut skipped = 0;
        for round in 0..200 {
            let calls: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
            // The caller returns at once: helpers join only if they are quick.
            crew.run(&|index| {
                calls[index].fetch_add(1, Ordering::SeqCst);
            });
            let after_run: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
            assert_eq!(after_run[0], 1, "round {round}: the caller's call");
            assert!(
                after_run.iter().all(|&c| c <= 1),
                "round {round}: {after_run:?}"
            );
            skipped += after_run.iter().filter(|&&c| c == 0).count();
            if round % 50 == 0 {
                // No helper starts this job after `run` returned.
                std::thread::sleep(Duration::from_millis(5));
                let later: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
                assert_eq!(later, after_run, "round {round}");
            }
        }
        // Helpers asleep after the 5 ms pauses cannot have made it every time.
        assert!(skipped > 0, "no helper was ever skipped");
    }

    #[test]
    fn dropping_the_crew_stops_its_threads() {
        let crew = Crew::new(2).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        drop(crew); // joins both helpers: the test would hang otherwise
    }
}
