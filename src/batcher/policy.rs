//! The batching policy: which queued entries go into the next forward pass, and when.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// Limits that shape a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most images in one forward pass (an entry larger than this still runs, alone).
    pub max_batch_size: usize,
    /// An optional wait to fill a batch that is not full, counted from when its oldest entry
    /// entered the queue (Triton's `max_queue_delay_microseconds`). Zero, the default: a batch is
    /// whatever is queued when the model is free, and no timer is ever set.
    pub max_delay: Duration,
}

/// Something waiting in the queue.
pub trait Queued: Sized {
    /// Images it adds to a batch.
    fn images(&self) -> usize;
    /// When it entered the queue.
    fn enqueued_at(&self) -> Instant;
    /// Itself when still worth computing at `now`; otherwise it is answered if need be (for
    /// example with a timeout) and dropped.
    fn still_wanted(self, now: Instant) -> Option<Self>;
}

/// Takes batches off the queue, continuously: called when the model is free, it waits for the
/// oldest live entry, then takes everything already queued behind it, up to a full batch. While
/// the model computes, the queue fills, so batches grow with load and a lone request never waits
/// for company. With a `max_delay`, a batch that is not full then waits for more entries until
/// `max_delay` after its oldest entry was queued.
#[derive(Debug)]
pub struct Collector<T> {
    queue: mpsc::Receiver<T>,
    policy: BatchPolicy,
    /// An entry that did not fit in the previous batch: it opens the next one.
    held: Option<T>,
}

/// Where filling a batch stopped.
enum Filled {
    /// Full, or an entry that does not fit is held for the next batch.
    Full,
    /// Nothing more is queued right now (or the queue is closed).
    Drained,
}

impl<T: Queued> Collector<T> {
    pub fn new(queue: mpsc::Receiver<T>, policy: BatchPolicy) -> Self {
        Self {
            queue,
            policy,
            held: None,
        }
    }

    /// The next batch, in queue order; `None` once the queue is closed and empty.
    pub async fn next_batch(&mut self) -> Option<Vec<T>> {
        let first = loop {
            let entry = match self.held.take() {
                Some(entry) => entry,
                None => self.queue.recv().await?,
            };
            if let Some(entry) = entry.still_wanted(Instant::now()) {
                break entry;
            }
        };
        let close_at = saturating_add(first.enqueued_at(), self.policy.max_delay);
        let (mut batch, mut images, filled) = self.fill(first);
        if let Filled::Full = filled {
            return Some(batch);
        }
        // The optional wait for more; only then is there a timer.
        if !self.policy.max_delay.is_zero() {
            while images < self.policy.max_batch_size && Instant::now() < close_at {
                let entry = match tokio::time::timeout_at(close_at, self.queue.recv()).await {
                    Ok(Some(entry)) => entry,
                    Ok(None) | Err(_) => break,
                };
                if let Filled::Full = self.add(&mut batch, &mut images, entry) {
                    break;
                }
            }
        }
        Some(batch)
    }

    /// The next batch if an entry is queued right now, without waiting: for a model still busy
    /// with the end of the previous batch on some of its threads. With a batching delay, always
    /// `None`: a batch that may wait to fill is collected by [`Self::next_batch`] alone, once
    /// the model is idle.
    pub fn try_next_batch(&mut self) -> Option<Vec<T>> {
        if !self.policy.max_delay.is_zero() {
            return None;
        }
        let first = loop {
            let entry = match self.held.take() {
                Some(entry) => entry,
                None => self.queue.try_recv().ok()?,
            };
            if let Some(entry) = entry.still_wanted(Instant::now()) {
                break entry;
            }
        };
        Some(self.fill(first).0)
    }

    /// `first` and everything queued behind it at this instant, without waiting, up to a full
    /// batch; with its image count.
    fn fill(&mut self, first: T) -> (Vec<T>, usize, Filled) {
        let mut images = first.images();
        let mut batch = vec![first];
        while let Ok(entry) = self.queue.try_recv() {
            if let Filled::Full = self.add(&mut batch, &mut images, entry) {
                return (batch, images, Filled::Full);
            }
        }
        (batch, images, Filled::Drained)
    }

    /// Adds `entry` to `batch` if it is still wanted and fits; holds it for the next batch if
    /// it does not fit.
    fn add(&mut self, batch: &mut Vec<T>, images: &mut usize, entry: T) -> Filled {
        let Some(entry) = entry.still_wanted(Instant::now()) else {
            return Filled::Drained;
        };
        if *images + entry.images() > self.policy.max_batch_size {
            self.held = Some(entry);
            return Filled::Full;
        }
        *images += entry.images();
        batch.push(entry);
        if *images >= self.policy.max_batch_size {
            Filled::Full
        } else {
            Filled::Drained
        }
    }
}

/// `at + duration`, or a day after `at` when that would overflow the clock.
pub fn saturating_add(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .unwrap_or_else(|| at + Duration::from_secs(86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Item {
        id: u32,
        images: usize,
        enqueued_at: Instant,
        wanted: bool,
    }

    impl Queued for Item {
        fn images(&self) -> usize {
            self.images
        }
        fn enqueued_at(&self) -> Instant {
            self.enqueued_at
        }
        fn still_wanted(self, _now: Instant) -> Option<Self> {
            self.wanted.then_some(self)
        }
    }

    fn item(id: u32, images: usize) -> Item {
        Item {
            id,
            images,
            enqueued_at: Instant::now(),
            wanted: true,
        }
    }

    fn setup(max_batch_size: usize, delay_ms: u64) -> (mpsc::Sender<Item>, Collector<Item>) {
        let (tx, rx) = mpsc::channel(64);
        let policy = BatchPolicy {
            max_batch_size,
            max_delay: Duration::from_millis(delay_ms),
        };
        (tx, Collector::new(rx, policy))
    }

    fn ids(batch: &[Item]) -> Vec<u32> {
        batch.iter().map(|i| i.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_a_lone_entry_goes_at_once() {
        let (tx, mut collector) = setup(8, 0);
        let start = Instant::now();
        tx.send(item(1, 1)).await.unwrap();
        let batch = collector.next_batch().await.unwrap();
        assert_eq!(ids(&batch), [1]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_a_batch_is_everything_queued_and_later_entries_wait_for_the_next() {
        let (tx, mut collector) = setup(8, 0);
        for id in 1..=3 {
            tx.send(item(id, 1)).await.unwrap();
        }
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [1, 2, 3]);
        // Arrivals while the model computed make up the next batch.
        tx.send(item(4, 2)).await.unwrap();
        tx.send(item(5, 1)).await.unwrap();
        let start = Instant::now();
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [4, 5]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_entry_waits_the_full_delay_then_goes_alone() {
        let (tx, mut collector) = setup(8, 5);
        let start = Instant::now();
        tx.send(item(1, 1)).await.unwrap();
        let batch = collector.next_batch().await.unwrap();
        assert_eq!(ids(&batch), [1]);
        assert_eq!(start.elapsed(), Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_arriving_within_the_delay_join_the_batch_and_later_ones_do_not() {
        let (tx, mut collector) = setup(8, 10);
        let keep_open = tx.clone();
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            tx.send(item(1, 1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
            tx.send(item(2, 1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
            tx.send(item(3, 2)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
            tx.send(item(4, 1)).await.unwrap();
        });
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [1, 2, 3]);
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [4]);
        // Entry 4 arrived at 12 ms: its batch closes 10 ms later.
        assert_eq!(start.elapsed(), Duration::from_millis(22));
        sender.await.unwrap();
        drop(keep_open);
        assert!(collector.next_batch().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once() {
        let (tx, mut collector) = setup(3, 1000);
        let start = Instant::now();
        for id in 1..=4 {
            tx.send(item(id, 1)).await.unwrap();
        }
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [1, 2, 3]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_that_does_not_fit_opens_the_next_batch_and_an_oversized_one_runs_alone() {
        let (tx, mut collector) = setup(4, 0);
        tx.send(item(1, 3)).await.unwrap();
        tx.send(item(2, 2)).await.unwrap();
        tx.send(item(3, 9)).await.unwrap();
        tx.send(item(4, 1)).await.unwrap();
        drop(tx);
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [1]);
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [2]);
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [3]);
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [4]);
        assert!(collector.next_batch().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn entries_that_waited_past_the_delay_go_without_further_waiting() {
        let (tx, mut collector) = setup(8, 5);
        tx.send(item(1, 1)).await.unwrap();
        tx.send(item(2, 1)).await.unwrap();
        // The model was busy: the entries have been queued longer than the delay.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [1, 2]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_a_busy_model_takes_what_is_queued_and_never_waits() {
        let (tx, mut collector) = setup(3, 0);
        assert!(collector.try_next_batch().is_none(), "nothing queued");
        let mut gone = item(1, 1);
        gone.wanted = false;
        tx.send(gone).await.unwrap();
        tx.send(item(2, 2)).await.unwrap();
        tx.send(item(3, 2)).await.unwrap();
        assert_eq!(ids(&collector.try_next_batch().unwrap()), [2]);
        // The entry that did not fit opens the next batch.
        assert_eq!(ids(&collector.try_next_batch().unwrap()), [3]);
        assert!(collector.try_next_batch().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_delay_batches_are_only_collected_by_an_idle_model() {
        let (tx, mut collector) = setup(8, 5);
        tx.send(item(1, 1)).await.unwrap();
        assert!(collector.try_next_batch().is_none());
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn unwanted_entries_are_skipped_and_do_not_count() {
        let (tx, mut collector) = setup(2, 0);
        let mut gone = item(1, 1);
        gone.wanted = false;
        tx.send(gone).await.unwrap();
        tx.send(item(2, 1)).await.unwrap();
        let mut gone = item(3, 1);
        gone.wanted = false;
        tx.send(gone).await.unwrap();
        tx.send(item(4, 1)).await.unwrap();
        drop(tx);
        assert_eq!(ids(&collector.next_batch().await.unwrap()), [2, 4]);
        assert!(collector.next_batch().await.is_none());
    }
}
