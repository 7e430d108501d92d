//! How the fast engine shares work between threads: the two ways of running an image (alone,
//! or as a team whose threads claim each layer's output rows), and how a team's threads wait
//! for the rows of a layer to be finished.
//!
//! A team does not wait for its members to arrive, only for the rows they took: rows are claimed
//! a few at a time from either end of a shared range, and a layer is complete when all its rows
//! are finished, whoever computed them. A member that starts late (woken late, or preempted) finds
//! the early layers finished and skips them, and one that never starts leaves its share to the
//! others. With a barrier per layer instead, every one of an image's ~56 layers waited for the
//! slowest member, which on shared vCPUs made the tail of one-image latency.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::signal::Signal;

/// Busy-wait iterations before a waiting thread goes to sleep: about 50 microseconds (a
/// `spin_loop` hint takes some 45 ns on the Zen 4 this was tuned on). A layer of one image takes
/// tens of microseconds, so on an idle machine the rows being finished usually are while we spin;
/// on a busy one their thread may be descheduled, and sleeping hands it our core instead of
/// burning it.
const SPINS_BEFORE_SLEEP: u32 = 1_000;

/// Claims per member and layer: a layer's rows go in chunks of about
/// `rows / (CLAIMS_PER_MEMBER * members)`, so that a member held up leaves little to wait for
/// while chunks stay large enough to keep the kernels' tiles full.
const CLAIMS_PER_MEMBER: usize = 2;

/// Which output rows of a layer the calling thread computes, and how it waits for the others.
///
/// # Safety
/// The network writes shared buffers from several threads on the strength of this trait, so an
/// implementation must guarantee, for the threads that share one partition (one value per
/// thread), provided each of them makes the same sequence of `share` and `share_once` calls (the
/// same methods with the same `n`s) with `sync`s at the same places: the ranges either hands to
/// `compute`, over all threads, are disjoint and together cover `0..n`; `sync` returns only
/// after every range handed out before it, by any thread, has been computed (its `compute`
/// returned), with everything written there visible to the caller.
pub unsafe trait Partition {
    /// Runs `compute` on this thread's share of the `n` rows of the current layer.
    fn share(&self, n: usize, compute: impl FnMut(Range<usize>));
    /// [`Self::share`] in one claim per thread, for layers where every claim has a cost of its
    /// own, whatever its size: a Winograd group reads all of the layer's filters.
    fn share_once(&self, n: usize, compute: impl FnMut(Range<usize>));
    /// Waits until every row shared so far has been computed.
    fn sync(&self);
}

/// One thread runs the whole image.
#[derive(Debug, Clone, Copy)]
pub struct Alone;

// SAFETY: a partition of one thread: all rows at once, nothing to wait for.
unsafe impl Partition for Alone {
    fn share(&self, n: usize, mut compute: impl FnMut(Range<usize>)) {
        if n > 0 {
            compute(0..n);
        }
    }
    fn share_once(&self, n: usize, compute: impl FnMut(Range<usize>)) {
        self.share(n, compute);
    }
    fn sync(&self) {}
}

/// Bits of [`TeamWork::claims`] for the rows of a layer: its first and last unclaimed row.
const ROW_BITS: u32 = 20;
const ROW_MASK: u64 = (1 << ROW_BITS) - 1;
/// Bits for the layer: more than a pass of one image per member at [`super::MAX_THREADS`].
const LAYER_BITS: u32 = 64 - 2 * ROW_BITS;

/// What the members of a team share for one forward pass: which rows are taken, how many are
/// finished, and how to sleep until more are. Made afresh for every pass.
#[derive(Debug)]
pub struct TeamWork {
    members: usize,
    /// The layer being claimed (counted from 1 in each member's sequence of `share` and
    /// `share_once` calls) in the high [`LAYER_BITS`], then the first and one past the last of its
    /// unclaimed rows ([`ROW_BITS`] each): members claim from the front or the back
    /// ([`Member::new`]).
    claims: AtomicU64,
    /// Rows finished in this pass, over all layers.
    finished: AtomicUsize,
    /// Where members wait for rows to be finished.
    progress: Signal,
    /// A member panicked: the rows it took will never be finished.
    broken: AtomicBool,
}

impl TeamWork {
    pub fn new(members: usize) -> Self {
        Self {
            members: members.max(1),
            claims: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            progress: Signal::default(),
            broken: AtomicBool::new(false),
        }
    }

    /// Releases every waiter, now and later, with a panic: called when a member panics, so that
    /// the others do not wait forever for the rows it took.
    pub fn break_team(&self) {
        self.broken.store(true, Ordering::SeqCst);
        self.progress.notify();
    }

    fn check_broken(&self) {
        if self.broken.load(Ordering::Relaxed) {
            panic!("another thread of the team panicked");
        }
    }

    /// The next `grain` rows (fewer when fewer are left) of layer `layer`, which has `n`, from
    /// the front or the back of those left; `None` once they are all taken.
    fn claim(&self, layer: u64, n: usize, grain: usize, back: bool) -> Option<Range<usize>> {
        // Relaxed: the counter only has to hand every row out once (the atomicity of the
        // exchange does that); what the rows' computation reads is ordered by `finished`.
        let mut current = self.claims.load(Ordering::Relaxed);
        loop {
            let claiming = current >> (2 * ROW_BITS);
            let left = match claiming.cmp(&layer) {
                // A member moves on to a layer only once it found the previous ones all taken.
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Less => 0..n,
                std::cmp::Ordering::Equal => {
                    (current >> ROW_BITS & ROW_MASK) as usize..(current & ROW_MASK) as usize
                }
            };
            if left.is_empty() {
                return None;
            }
            let (rows, left) = if back {
                let start = left.end.saturating_sub(grain).max(left.start);
                (start..left.end, left.start..start)
            } else {
                let end = (left.start + grain).min(left.end);
                (left.start..end, end..left.end)
            };
            let claimed =
                layer << (2 * ROW_BITS) | (left.start as u64) << ROW_BITS | left.end as u64;
            match self.claims.compare_exchange_weak(
                current,
                claimed,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(rows),
                Err(now) => current = now,
            }
        }
    }

    /// Counts `rows` as finished and wakes the members that sleep waiting for rows.
    fn finish(&self, rows: usize) {
        // SeqCst for `Signal`; its release half publishes the rows' writes.
        self.finished.fetch_add(rows, Ordering::SeqCst);
        self.progress.notify();
    }

    /// Returns once `rows` rows of this pass are finished, with their writes visible.
    ///
    /// Panics when the team is broken (a member panicked).
    fn wait_for(&self, rows: usize) {
        // SeqCst loads for `Signal`; their acquire half makes the rows' writes visible.
        self.progress.wait_until(SPINS_BEFORE_SLEEP, || {
            self.finished.load(Ordering::SeqCst) >= rows || self.broken.load(Ordering::SeqCst)
        });
        self.check_broken();
    }
}

/// Breaks the team if dropped while its thread unwinds from a panic.
#[derive(Debug)]
pub struct BreakOnPanic<'a>(pub &'a TeamWork);

impl Drop for BreakOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.break_team();
        }
    }
}

/// One thread's membership of a team: it claims rows of each layer from the shared
/// [`TeamWork`] and counts the layers (and their rows) it has gone through.
#[derive(Debug)]
pub struct Member<'a> {
    work: &'a TeamWork,
    /// Layers this member has gone through (`share` and `share_once` calls).
    layers: Cell<u64>,
    /// Rows of those layers: what `sync` waits to see finished.
    rows: Cell<usize>,
    /// Claims rows from the back of those left, not the front.
    from_back: bool,
}

impl<'a> Member<'a> {
    /// Member `index` of a team (any numbering). Even members claim rows from the front of
    /// each layer, odd ones from the back, so that with two threads each computes the same
    /// part of every layer, whichever claims first, and reads mostly the rows it wrote itself
    /// the layer before, from its own core's cache. (Claimed in one sequence, the first to
    /// claim took the front, and the next layer read what the other core had written.)
    pub fn new(work: &'a TeamWork, index: usize) -> Self {
        Self {
            work,
            layers: Cell::new(0),
            rows: Cell::new(0),
            from_back: index % 2 == 1,
        }
    }
}

// SAFETY: each member numbers the layers by its own count of `share` and `share_once` calls, which
// is the same for all members (the trait's precondition). `TeamWork::claim` hands each row of layer
// `l` out once: it shrinks the range of `l`'s unclaimed rows, from either end, by exchange, and
// members reach `l + 1` only after finding `l`'s rows all taken, so a counter that moved past `l`
// means nothing of `l` is left. `sync` waits until `finished` counts every row of every layer so
// far, and members add rows only after computing them, with release ordering matched by
// `wait_for`'s acquire. Rows of later layers cannot be counted before (their members passed the
// same `sync` first).
unsafe impl Partition for Member<'_> {
    fn share(&self, n: usize, compute: impl FnMut(Range<usize>)) {
        self.claim_layer(n, CLAIMS_PER_MEMBER, compute);
    }
    fn share_once(&self, n: usize, compute: impl FnMut(Range<usize>)) {
        self.claim_layer(n, 1, compute);
    }
    fn sync(&self) {
        self.work.wait_for(self.rows.get());
    }
}

impl Member<'_> {
    /// The next layer's `n` rows, claimed in chunks of about `n / (claims * members)`.
    fn claim_layer(&self, n: usize, claims: usize, mut compute: impl FnMut(Range<usize>)) {
        assert!(
            n as u64 <= ROW_MASK,
            "rows are claimed as {ROW_BITS}-bit counts"
        );
        let layer = self.layers.get() + 1;
        assert!(
            layer < 1 << LAYER_BITS,
            "layers are counted in {LAYER_BITS} bits"
        );
        self.layers.set(layer);
        self.rows.set(self.rows.get() + n);
        let grain = n.div_ceil(claims * self.work.members).max(1);
        while let Some(rows) = self.work.claim(layer, n, grain, self.from_back) {
            let count = rows.len();
            compute(rows);
            self.work.finish(count);
        }
    }
}

/// Shortest and longest run of calls between two tries of the mode that currently looks slower.
const MIN_EXPLORE_INTERVAL: u64 = 8;
const MAX_EXPLORE_INTERVAL: u64 = 1024;
/// Weight of the newest measurement in the running average. Single passes vary by tens of
/// percent on shared vCPUs; a retry of the other mode is one measured call ([`Trial`]),
/// compared with this average, so an average that follows the noise closely lets a lucky retry
/// win and flip the choice (and every flip restarts frequent retries). Replayed on recorded
/// one-client passes of both modes (three runs, idle and with a competing process), 0.1 instead
/// of 0.3 halved the calls spent in the slower mode on the idle machine (12% to 6-7%) and
/// lowered the mean pass time by 1.0 to 1.5%; the average still follows a real change within a
/// few dozen calls.
///
/// Requiring the other mode to be 1.5x faster before switching to it was tried as well: live at
/// one client (2 vCPUs whose host was busy), it cut the passes run on one thread from 7.6-9.7% to
/// 0.2%, but the requests/s against this chooser were 0.91x, 1.05x and 0.93x in three alternated
/// runs (16 clients: 1.10x): some of the switches follow real phases of the machine.
const EMA_WEIGHT: f64 = 0.1;

/// Learns from wall times whether images that cannot go one per thread (a batch smaller than
/// the thread count) run faster with every layer split between threads or on one thread.
///
/// On an idle machine splitting layers nearly divides the latency by the thread count. When
/// other processes keep the cores busy, a member descheduled while it holds rows holds up every
/// layer it took part in, and the threads' claims and waits on each other cost more than they
/// save; one thread can then be faster. Which holds changes with the machine's load, so it is
/// measured, not assumed: the faster mode is used, the other retried now and then (less often
/// while it keeps losing).
#[derive(Debug, Clone)]
pub struct TeamChooser {
    team: Option<f64>,
    alone: Option<f64>,
    calls: u64,
    next_try: u64,
    interval: u64,
    /// A mode being measured afresh: its first measurement, or a retry of the slower one.
    trial: Option<Trial>,
}

/// A mode being measured afresh. A trial of the team starts with one call that is not measured:
/// it pays for what the calls alone left cold. Run alone, the helpers sleep through every call,
/// so a team's first call after a spell alone took 660-980 us per image against a team average
/// of 600-650 (`bench` at batch 1, 2 threads, AVX-512 machine, six runs). Judged on that call, a
/// retry of the team could lose to a one-thread average of 830-990 us, and each lost retry
/// doubled the wait for the next: one batch-1 `bench` run of 3 s ran nearly every pass on one
/// thread (1,198 img/s against 1,600). A call alone after team calls pays nothing of the kind.
#[derive(Debug, Clone, Copy)]
struct Trial {
    team: bool,
    /// The unmeasured call is done (from the start for one thread).
    warmed_up: bool,
}

impl Default for TeamChooser {
    fn default() -> Self {
        Self {
            team: None,
            alone: None,
            calls: 0,
            next_try: MIN_EXPLORE_INTERVAL,
            interval: MIN_EXPLORE_INTERVAL,
            trial: None,
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
        if let Some(trial) = self.trial {
            return trial.team;
        }
        let team = match (self.team, self.alone, self.team_is_faster()) {
            (None, ..) => true,
            (_, None, _) => false,
            (.., Some(team_faster)) if self.calls >= self.next_try => {
                self.next_try = self.calls + self.interval;
                self.interval = (2 * self.interval).min(MAX_EXPLORE_INTERVAL);
                !team_faster
            }
            (.., team_faster) => return team_faster.unwrap_or(true),
        };
        self.trial = Some(Trial {
            team,
            warmed_up: !team,
        });
        team
    }

    /// Records how long a call took per image in the mode it used.
    pub fn record(&mut self, team: bool, seconds_per_image: f64) {
        // A trial's measured call replaces its mode's stale average; any other call moves it.
        let fresh = match &mut self.trial {
            Some(trial) if trial.team == team && !trial.warmed_up => {
                trial.warmed_up = true;
                return;
            }
            Some(trial) if trial.team == team => {
                self.trial = None;
                true
            }
            _ => false,
        };
        let before = self.team_is_faster();
        let average = if team {
            &mut self.team
        } else {
            &mut self.alone
        };
        *average = Some(match *average {
            Some(old) if !fresh => old + EMA_WEIGHT * (seconds_per_image - old),
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
    use std::panic::AssertUnwindSafe;
    use std::time::{Duration, Instant};

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
        assert_eq!(
            modes[..3],
            [true, true, false],
            "the team first (a call to warm up, one measured), then one thread"
        );
        // Then a retry of the team (two calls) now and then, less and less often (after 8, 16,
        // ... 1024 calls).
        let team_calls = modes.iter().filter(|&&t| t).count();
        assert!((4..=20).contains(&team_calls), "{team_calls} team calls");
        // The machine goes idle: the team becomes twice as fast and is adopted.
        let modes = drive(&mut chooser, 3000, 0.5e-3, 1e-3);
        let late_team = modes[1500..].iter().filter(|&&t| t).count();
        assert!(
            late_team > 1490,
            "{late_team} of the last 1500 calls used the team"
        );
    }

    #[test]
    fn a_team_slow_only_on_its_first_call_after_calls_alone_is_still_adopted() {
        // The team takes 0.6 ms per image once its helpers are awake, 1.5 ms on a call right
        // after one-thread calls (sleeping helpers, cold caches); one thread takes 0.9 ms.
        // Judged on that first call, every retry of the team would lose.
        let mut chooser = TeamChooser::default();
        let mut previous_team = false;
        let modes: Vec<bool> = (0..2000)
            .map(|_| {
                let team = chooser.choose();
                let seconds = match (team, previous_team) {
                    (true, true) => 0.6e-3,
                    (true, false) => 1.5e-3,
                    (false, _) => 0.9e-3,
                };
                chooser.record(team, seconds);
                previous_team = team;
                team
            })
            .collect();
        let late_team = modes[1000..].iter().filter(|&&t| t).count();
        assert!(
            late_team > 990,
            "{late_team} of the last 1000 calls used the team"
        );
    }

    #[test]
    fn noisy_pass_times_rarely_flip_the_choice_to_the_slower_mode() {
        // Pass times that vary as on shared vCPUs (a log-normal-like factor with a spread of
        // about 20%, as in passes recorded at one client), the team 1.3x faster on average: 10
        // runs of 3,000 calls. An average that followed each pass closely (weight 0.3) ran 4.8%
        // of these calls in the slower mode, the current one 1.6%; it must stay under 4%.
        const RUNS: usize = 10;
        const CALLS: usize = 3000;
        let uniform = crate::model::fast::testing::noise(4 * RUNS * CALLS, 7);
        let mut factors = uniform.chunks_exact(4).map(|u| {
            // Sum of four uniforms on [-1, 1): about normal, standard deviation 2/sqrt(3).
            let normal = u.iter().map(|&v| f64::from(v)).sum::<f64>() * 3f64.sqrt() / 2.0;
            (0.2 * normal).exp()
        });
        let mut alone = 0;
        for _ in 0..RUNS {
            let mut chooser = TeamChooser::default();
            for _ in 0..CALLS {
                let team = chooser.choose();
                let factor = factors.next().expect("enough noise");
                chooser.record(team, if team { 1e-3 } else { 1.3e-3 } * factor);
                alone += usize::from(!team);
            }
        }
        let share = alone as f64 / (RUNS * CALLS) as f64;
        assert!(
            share < 0.04,
            "{:.1}% of calls in the slower mode",
            share * 100.0
        );
    }

    /// Runs `layers` (row counts, each followed by a sync) on `members` threads, the last
    /// `late` of them starting only after `delay`. Asserts that each layer is finished before
    /// any row of the next is computed and that every row is computed exactly once; returns how
    /// long the first member (never late) took.
    fn run_team(members: usize, late: usize, delay: Duration, layers: &[usize]) -> Duration {
        let work = TeamWork::new(members);
        let computed: Vec<Vec<AtomicUsize>> = layers
            .iter()
            .map(|&n| (0..n).map(|_| AtomicUsize::new(0)).collect())
            .collect();
        let started = Instant::now();
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..members)
                .map(|index| {
                    let (work, computed) = (&work, &computed);
                    s.spawn(move || {
                        if index >= members - late {
                            std::thread::sleep(delay);
                        }
                        let member = Member::new(work, index);
                        for (layer, &n) in layers.iter().enumerate() {
                            member.share(n, |rows| {
                                if let Some(previous) = layer.checked_sub(1) {
                                    for count in &computed[previous] {
                                        assert_eq!(count.load(Ordering::Relaxed), 1);
                                    }
                                }
                                for row in rows {
                                    computed[layer][row].fetch_add(1, Ordering::Relaxed);
                                }
                            });
                            member.sync();
                        }
                        started.elapsed()
                    })
                })
                .collect();
            let times: Vec<Duration> = threads
                .into_iter()
                .map(|t| t.join().expect("no member panics"))
                .collect();
            for (layer, counts) in computed.iter().enumerate() {
                for (row, count) in counts.iter().enumerate() {
                    assert_eq!(count.load(Ordering::Relaxed), 1, "layer {layer} row {row}");
                }
            }
            times[0]
        })
    }

    #[test]
    fn a_team_computes_every_row_once_and_each_layer_before_the_next() {
        let layers = [32, 8, 0, 1, 16, 2, 2, 7, 64];
        for members in [1, 2, 3, 4] {
            for _ in 0..20 {
                run_team(members, 0, Duration::ZERO, &layers);
            }
        }
    }

    /// With two members that both take part, each computes the same half of every layer,
    /// whichever claims first: the rows it reads next were written by its own core.
    #[test]
    fn two_members_keep_their_half_of_every_layer() {
        for _ in 0..20 {
            let work = TeamWork::new(2);
            // Each member holds its claim until the other has one too.
            let both_hold = std::sync::Barrier::new(2);
            let halves: Vec<Vec<Range<usize>>> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..2)
                    .map(|index| {
                        let (work, both_hold) = (&work, &both_hold);
                        s.spawn(move || {
                            let member = Member::new(work, index);
                            let mut taken = Vec::new();
                            for n in [8, 6, 2] {
                                member.share_once(n, |rows| {
                                    both_hold.wait();
                                    taken.push(rows);
                                });
                                member.sync();
                            }
                            taken
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!(halves[0], [0..4, 0..3, 0..1]);
            assert_eq!(halves[1], [4..8, 3..6, 1..2]);
        }
    }

    #[test]
    fn the_team_does_not_wait_for_members_that_start_late() {
        // Two of three members start 2 s late: the first does their share and finishes long
        // before; they then find every layer taken and compute nothing twice.
        let first = run_team(3, 2, Duration::from_secs(2), &[32, 8, 1, 16, 2]);
        assert!(
            first < Duration::from_millis(1500),
            "the first member took {first:?}"
        );
    }

    #[test]
    fn a_panicking_member_releases_its_team() {
        let work = TeamWork::new(2);
        let taken = AtomicBool::new(false);
        let other = std::thread::scope(|s| {
            let other = s.spawn(|| {
                // Starts once the other member holds rows it will never finish.
                while !taken.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let member = Member::new(&work, 1);
                    member.share(4, |_| {});
                    member.sync();
                }))
            });
            let failed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let _guard = BreakOnPanic(&work);
                let member = Member::new(&work, 0);
                member.share(4, |_| {
                    taken.store(true, Ordering::SeqCst);
                    panic!("a bug in one thread");
                });
            }));
            assert!(failed.is_err());
            other.join().expect("its panic is caught")
        });
        let panic = other.expect_err("the other member's sync panics instead of waiting forever");
        assert_eq!(
            panic.downcast_ref::<&str>(),
            Some(&"another thread of the team panicked")
        );
    }
}
