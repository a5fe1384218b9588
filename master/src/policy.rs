//! The restart policy: crash loops never become fork loops.
//!
//! Two mechanisms, both in the Erlang/OTP manner and both pure bookkeeping
//! (no syscalls, no clocks read here: the caller passes `now`):
//!
//! - [`Backoff`]: a worker that dies young (before Ready, or within the
//!   minimum uptime) is replaced after a delay that doubles from `initial`
//!   up to `cap`, per slot. A worker that lived long enough resets its
//!   slot's delay. The other slots go on serving meanwhile.
//! - [`RestartLimit`]: more than `max` restarts within `window` and the
//!   master gives up, so that systemd or an operator can act.
//!
//! What counts as a restart is decided by the master (`master.rs`): a worker
//! that died without warning, or failed before it was Ready. A worker that
//! sent Suicide after Ready (a request made it panic, or it served its
//! share) is a handover, not a failure: it is neither delayed nor counted,
//! or any client could take the service down by asking for a crashing URL
//! eleven times a minute.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Per-slot respawn delays.
pub(crate) struct Backoff {
    initial: Duration,
    cap: Duration,
    slots: Vec<SlotDelay>,
}

#[derive(Clone, Copy, Default)]
struct SlotDelay {
    /// The delay applied after the last young death; zero when healthy.
    delay: Duration,
    /// No fork into this slot before then.
    not_before: Option<Instant>,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, cap: Duration) -> Backoff {
        Backoff {
            initial,
            cap: cap.max(initial),
            slots: Vec::new(),
        }
    }

    fn slot(&mut self, slot: usize) -> &mut SlotDelay {
        if slot >= self.slots.len() {
            self.slots.resize(slot + 1, SlotDelay::default());
        }
        &mut self.slots[slot]
    }

    /// A worker of `slot` died young: returns how long the slot now waits.
    pub(crate) fn died_young(&mut self, slot: usize, now: Instant) -> Duration {
        let (initial, cap) = (self.initial, self.cap);
        let entry = self.slot(slot);
        entry.delay = if entry.delay.is_zero() {
            initial
        } else {
            (entry.delay * 2).min(cap)
        };
        entry.not_before = Some(now + entry.delay);
        entry.delay
    }

    /// A worker of `slot` lived long enough: its next replacement is immediate.
    pub(crate) fn lived(&mut self, slot: usize) {
        *self.slot(slot) = SlotDelay::default();
    }

    /// The slots that must not be filled at `now`.
    pub(crate) fn waiting(&self, now: Instant) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.not_before.is_some_and(|at| at > now))
            .map(|(slot, _)| slot)
    }

    /// Every slot that failed recently: its delay, and until when it waits
    /// (for a re-executed master to carry on where this one was).
    pub(crate) fn slots(&self) -> impl Iterator<Item = (usize, Duration, Option<Instant>)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.delay.is_zero() || s.not_before.is_some())
            .map(|(slot, s)| (slot, s.delay, s.not_before))
    }

    /// Takes a slot's state back, as [`Backoff::slots`] gave it; a delay
    /// above the cap is brought down to it.
    pub(crate) fn restore(&mut self, slot: usize, delay: Duration, not_before: Option<Instant>) {
        let cap = self.cap;
        *self.slot(slot) = SlotDelay {
            delay: delay.min(cap),
            not_before,
        };
    }

    /// The nearest moment a waiting slot may be filled, if any waits.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| s.not_before)
            .filter(|&at| at > now)
            .min()
    }
}

/// More than `max` restarts in `window` means the workers cannot run.
pub(crate) struct RestartLimit {
    max: usize,
    window: Duration,
    /// When the recent restarts happened; at most `max + 1` are kept.
    recent: VecDeque<Instant>,
}

/// The limit was passed: `count` restarts within `span`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Exceeded {
    pub count: usize,
    pub span: Duration,
}

impl RestartLimit {
    pub(crate) fn new(max: usize, window: Duration) -> RestartLimit {
        RestartLimit {
            max,
            window,
            // Grown as restarts come: `max` is the caller's, any number.
            recent: VecDeque::new(),
        }
    }

    /// How many restarts lie within the window ending `now`.
    pub(crate) fn in_window(&self, now: Instant) -> usize {
        self.recent
            .iter()
            .filter(|&&at| now.saturating_duration_since(at) <= self.window)
            .count()
    }

    /// When the restarts still remembered happened, oldest first.
    pub(crate) fn history(&self) -> impl Iterator<Item = Instant> + '_ {
        self.recent.iter().copied()
    }

    /// Takes back a history as [`RestartLimit::history`] gave it; only the
    /// last `max + 1` are kept, as `record` would.
    pub(crate) fn restore(&mut self, history: impl IntoIterator<Item = Instant>) {
        self.recent.clear();
        for at in history {
            if self.recent.len() > self.max {
                self.recent.pop_front();
            }
            self.recent.push_back(at);
        }
    }

    /// Records a restart at `now`; an error if it is one too many.
    pub(crate) fn record(&mut self, now: Instant) -> Result<(), Exceeded> {
        while self
            .recent
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if self.recent.len() > self.max {
            let first = self.recent.front().copied().unwrap_or(now);
            return Err(Exceeded {
                count: self.recent.len(),
                span: now.saturating_duration_since(first),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_a_good_life() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let now = Instant::now();
        let delays: Vec<_> = (0..6).map(|_| backoff.died_young(3, now)).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(backoff.waiting(now).collect::<Vec<_>>(), [3]);
        assert_eq!(backoff.waiting(now + 1000 * MS).count(), 0);
        assert_eq!(backoff.next_deadline(now), Some(now + 1000 * MS));
        backoff.lived(3);
        assert_eq!(backoff.waiting(now).count(), 0);
        assert_eq!(backoff.died_young(3, now), 100 * MS);
    }

    #[test]
    fn slots_back_off_independently() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let now = Instant::now();
        backoff.died_young(0, now);
        backoff.died_young(0, now);
        assert_eq!(
            backoff.waiting(now).collect::<Vec<_>>(),
            [0],
            "slot 1 never failed"
        );
        assert_eq!(backoff.died_young(1, now), 100 * MS);
        assert_eq!(backoff.next_deadline(now), Some(now + 100 * MS));
        assert_eq!(backoff.next_deadline(now + 150 * MS), Some(now + 200 * MS));
        assert_eq!(backoff.next_deadline(now + 250 * MS), None);
    }

    #[test]
    fn more_than_max_restarts_in_the_window_is_too_many() {
        let mut limit = RestartLimit::new(5, Duration::from_secs(60));
        let start = Instant::now();
        for i in 0..5 {
            assert_eq!(limit.record(start + i * MS), Ok(()), "restart {i}");
        }
        assert_eq!(
            limit.record(start + 5 * MS),
            Err(Exceeded {
                count: 6,
                span: 5 * MS
            })
        );
    }

    #[test]
    fn restarts_older_than_the_window_are_forgotten() {
        let mut limit = RestartLimit::new(2, Duration::from_secs(10));
        let start = Instant::now();
        let second = Duration::from_secs(1);
        assert!(limit.record(start).is_ok());
        assert!(limit.record(start + 5 * second).is_ok());
        assert!(limit.record(start + 11 * second).is_ok(), "the first fell out");
        assert!(limit.record(start + 12 * second).is_err(), "three within 10 s");
        assert!(limit.recent.len() <= 3, "bounded");
    }

    #[test]
    fn zero_restarts_allowed_gives_up_at_the_first() {
        let mut limit = RestartLimit::new(0, Duration::from_secs(60));
        assert!(limit.record(Instant::now()).is_err());
    }

    #[test]
    fn a_restart_exactly_one_window_old_still_counts() {
        let mut limit = RestartLimit::new(1, Duration::from_secs(10));
        let start = Instant::now();
        assert!(limit.record(start).is_ok());
        assert!(
            limit.record(start + Duration::from_secs(10)).is_err(),
            "10 s apart is within a 10 s window"
        );
    }

    #[test]
    fn backoff_and_history_are_carried_whole() {
        let now = Instant::now();
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        backoff.died_young(2, now);
        backoff.died_young(2, now);
        let slots: Vec<_> = backoff.slots().collect();
        assert_eq!(slots, [(2, 200 * MS, Some(now + 200 * MS))]);
        let mut next = Backoff::new(100 * MS, 1000 * MS);
        for (slot, delay, at) in slots {
            next.restore(slot, delay, at);
        }
        assert_eq!(
            next.died_young(2, now),
            400 * MS,
            "it doubles on from where it was"
        );
        next.restore(1, 60_000 * MS, None);
        assert_eq!(next.died_young(1, now), 1000 * MS, "never above the cap");

        let mut limit = RestartLimit::new(2, Duration::from_secs(60));
        for i in 0..2 {
            limit.record(now + i * MS).unwrap();
        }
        let mut carried = RestartLimit::new(2, Duration::from_secs(60));
        carried.restore(limit.history());
        assert_eq!(carried.in_window(now + 5 * MS), 2);
        assert!(
            carried.record(now + 5 * MS).is_err(),
            "the third in the window is too many"
        );
        carried.restore((0..100).map(|i| now + i * MS));
        assert_eq!(carried.history().count(), 3, "bounded like record");
    }

    #[test]
    fn a_slot_free_at_now_is_no_deadline() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let now = Instant::now();
        backoff.died_young(0, now);
        assert_eq!(
            backoff.next_deadline(now + 100 * MS),
            None,
            "it may be filled now"
        );
        assert_eq!(backoff.waiting(now + 100 * MS).count(), 0);
    }
}
