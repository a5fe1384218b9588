//! The worker table: who is alive, in which state, and how many count.
//!
//! A worker goes `Starting` (forked) -> `Ready` (said so) -> `Retiring` (it
//! sent Suicide, spoke garbage, or was asked to stop) -> gone (reaped).
//! Only Starting and Ready workers count towards the target: a Retiring one
//! is already replaced, so its exit replaces nothing. That one rule is what
//! keeps the article's bug away (it replaced a worker on both its suicide
//! message and its exit, so every crash added a worker).
//!
//! A Suicide from a worker still Starting changes nothing but the record of
//! why: it holds no connection, so there is nothing to hand over, and its
//! exit is a failed start, replaced after the slot's backoff.
//!
//! Garbage on a worker's pipe changes no count either: the master stops that
//! worker, and its exit is judged like any death without warning (a failed
//! start if it never said Ready), so a worker that speaks a newer contract
//! backs off and gives up like any crash loop, instead of being replaced at
//! once, forever.

use crate::hung::Sample;
use mio::Token;
use nix::unistd::Pid;
use respawn_ipc::{DecodeError, Decoder, Message};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Starting,
    Ready,
    Retiring,
}

/// What can happen to a live worker. Its exit is not here: an exited worker
/// leaves the table, whatever its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// It sent Ready.
    Ready,
    /// It sent Suicide.
    Suicide,
    /// Its pipe carried bytes that are not a message.
    Malformed,
    /// The master asked it to stop.
    Stop,
}

impl State {
    /// The state machine, whole.
    pub(crate) fn next(self, event: Event) -> State {
        match (self, event) {
            (State::Starting | State::Ready, Event::Ready) => State::Ready,
            (State::Retiring, Event::Ready) => State::Retiring,
            (State::Starting, Event::Suicide) => State::Starting,
            (state, Event::Malformed) => state,
            (_, Event::Suicide | Event::Stop) => State::Retiring,
        }
    }

    /// Does a worker in this state count towards the target?
    pub(crate) fn counts(self) -> bool {
        self != State::Retiring
    }
}

/// The build the master wants its workers to run: this program image, and
/// a generation at least this one (HUP and USR2 raise it). A worker's own
/// build never changes; what is wanted does, and a worker that does not run
/// it is outdated and replaced, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub image: u32,
    pub since: u64,
}

impl Wanted {
    pub(crate) fn is_run_by(self, worker: &Worker) -> bool {
        worker.image == self.image && worker.generation >= self.since
    }
}

pub(crate) struct Worker {
    pub pid: Pid,
    /// A small number, unique among live workers: its name (`worker 3`),
    /// the unit of backoff, and its row in the scoreboard.
    pub slot: usize,
    pub state: State,
    pub spawned_at: Instant,
    /// The build it runs, fixed at its fork and never rewritten: the
    /// program image (the master's own, or the new binary of an upgrade)
    /// and the master's generation then (bumped by HUP and USR2).
    pub image: u32,
    pub generation: u64,
    /// The reason of its Suicide, if it sent one: why it went.
    pub last_words: Option<String>,
    /// The mio token of its pipe; never reused, so a stale event for a
    /// reaped worker finds nobody.
    pub token: Token,
    /// The read end of its pipe; None once closed (EOF, garbage, exit).
    pub pipe: Option<OwnedFd>,
    pub decoder: Decoder,
    /// When it is SIGKILLed if still alive: set when it starts retiring.
    pub kill_at: Option<Instant>,
    /// SIGKILL was sent; only its exit is awaited.
    pub killed: bool,
    /// Its CPU time, read while it was busy for half the hung timeout.
    pub cpu_sample: Option<Sample>,
    /// It was killed as hung (for the exit's cause in `metrics`).
    pub hung: bool,
    /// It said Ready once: from then on its death is not a failed start.
    pub was_ready: bool,
    /// Its own NOTIFY_SOCKET (`--ready-on-notify`, notified.rs).
    pub notify: Option<std::os::unix::net::UnixDatagram>,
    /// The last STATUS= it sent there.
    pub notify_status: Option<String>,
    /// When it last sent WATCHDOG=1, if it ever did.
    pub watchdog_at: Option<Instant>,
}

impl Worker {
    pub(crate) fn new(pid: Pid, slot: usize, token: Token, pipe: Option<OwnedFd>) -> Worker {
        Worker {
            pid,
            slot,
            state: State::Starting,
            spawned_at: Instant::now(),
            image: 0,
            generation: 0,
            last_words: None,
            token,
            pipe,
            decoder: Decoder::new(),
            kill_at: None,
            killed: false,
            cpu_sample: None,
            hung: false,
            was_ready: false,
            notify: None,
            notify_status: None,
            watchdog_at: None,
        }
    }

    /// When it is hung for want of a WATCHDOG=1, if it ever sent one.
    pub(crate) fn watchdog_deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        match (self.watchdog_at, timeout) {
            (Some(at), Some(timeout)) if !self.killed && self.state.counts() => Some(at + timeout),
            _ => None,
        }
    }

    /// When it must have said Ready, if it has not yet.
    pub(crate) fn start_deadline(&self, start_timeout: Option<Duration>) -> Option<Instant> {
        match (self.state, start_timeout) {
            (State::Starting, Some(timeout)) if !self.killed => Some(self.spawned_at + timeout),
            _ => None,
        }
    }

    /// The next message from its pipe, reading only when the decoder has no
    /// whole message left.
    pub(crate) fn receive(&mut self) -> Received {
        loop {
            match self.decoder.next() {
                Ok(Some(message)) => return Received::Message(message),
                Ok(None) => {}
                Err(err) => return Received::Malformed(err),
            }
            let Some(pipe) = &self.pipe else {
                return Received::Closed;
            };
            match nix::unistd::read(pipe, self.decoder.spare()) {
                Ok(0) => return Received::Closed,
                Ok(n) => self.decoder.filled(n),
                Err(nix::errno::Errno::EAGAIN) => return Received::Nothing,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Received::Failed(err),
            }
        }
    }
}

pub(crate) enum Received {
    Message(Message),
    /// Nothing more to read for now.
    Nothing,
    /// EOF: the worker closed its end, which means it is exiting.
    Closed,
    Malformed(DecodeError),
    Failed(nix::errno::Errno),
}

#[derive(Default)]
pub(crate) struct Table {
    workers: Vec<Worker>,
}

impl Table {
    pub(crate) fn insert(&mut self, worker: Worker) {
        self.workers.push(worker);
    }

    pub(crate) fn remove(&mut self, pid: Pid) -> Option<Worker> {
        let index = self.workers.iter().position(|w| w.pid == pid)?;
        Some(self.workers.swap_remove(index))
    }

    pub(crate) fn by_token(&mut self, token: Token) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.token == token)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.workers.iter_mut()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// How many workers count towards the target.
    pub(crate) fn counted(&self) -> usize {
        self.workers.iter().filter(|w| w.state.counts()).count()
    }

    /// How many workers to fork so that `target` count.
    pub(crate) fn missing(&self, target: usize) -> usize {
        target.saturating_sub(self.counted())
    }

    pub(crate) fn any_starting(&self) -> bool {
        self.workers.iter().any(|w| w.state == State::Starting)
    }

    /// How many counted workers do not run the build `wanted`.
    pub(crate) fn outdated(&self, wanted: Wanted) -> usize {
        self.workers
            .iter()
            .filter(|w| w.state.counts() && !wanted.is_run_by(w))
            .count()
    }

    /// The counted worker not of the build `wanted` forked first.
    pub(crate) fn oldest_outdated(&mut self, wanted: Wanted) -> Option<&mut Worker> {
        self.workers
            .iter_mut()
            .filter(|w| w.state.counts() && !wanted.is_run_by(w))
            .min_by_key(|w| w.spawned_at)
    }

    /// Has a worker of `image` said Ready, and is it still alive and counted?
    pub(crate) fn proved(&self, image: u32) -> bool {
        self.workers
            .iter()
            .any(|w| w.image == image && w.was_ready && w.state.counts())
    }

    /// The counted worker forked last.
    pub(crate) fn newest_counted(&mut self) -> Option<&mut Worker> {
        self.workers
            .iter_mut()
            .filter(|w| w.state.counts())
            .max_by_key(|w| w.spawned_at)
    }

    /// The slots no live worker (retiring ones included) holds, lowest first.
    /// One pass over the table, not one per slot: with thousands of workers
    /// a respawn must not cost a quadratic scan.
    fn free_slots(&self) -> impl Iterator<Item = usize> {
        let end = self.workers.iter().map(|w| w.slot + 1).max().unwrap_or(0);
        let mut taken = vec![false; end];
        for worker in &self.workers {
            taken[worker.slot] = true;
        }
        let holes: Vec<usize> = (0..taken.len()).filter(|&slot| !taken[slot]).collect();
        holes.into_iter().chain(taken.len()..)
    }

    /// Where to fork now so that `target` count, at most `room` forks: the
    /// lowest free slots, one per missing worker, except those that wait out
    /// their backoff. A waiting slot keeps its vacancy (forking into another
    /// free slot instead would skip the delay), but only when it is among
    /// the slots to fill: one left above the target by a TTOU owes nothing.
    pub(crate) fn slots_to_fill(&self, target: usize, waiting: &[usize], room: usize) -> Vec<usize> {
        self.free_slots()
            .take(self.missing(target))
            .filter(|slot| !waiting.contains(slot))
            .take(room)
            .collect()
    }

    /// How many live workers no longer count (they are on their way out).
    pub(crate) fn retiring(&self) -> usize {
        self.workers.len() - self.counted()
    }

    /// The nearest moment a worker must be killed: a stopping one after the
    /// graceful timeout, a starting one after `start_timeout`.
    pub(crate) fn next_deadline(
        &self,
        start_timeout: Option<Duration>,
        watchdog: Option<Duration>,
    ) -> Option<Instant> {
        self.workers
            .iter()
            .filter(|w| !w.killed)
            .flat_map(|w| {
                [
                    w.kill_at,
                    w.start_deadline(start_timeout),
                    w.watchdog_deadline(watchdog),
                ]
            })
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;
    use State::*;

    #[test]
    fn state_machine_table() {
        let table = [
            (Starting, Event::Ready, State::Ready),
            (Starting, Suicide, Starting),
            (Starting, Malformed, Starting),
            (Starting, Stop, Retiring),
            (State::Ready, Event::Ready, State::Ready),
            (State::Ready, Suicide, Retiring),
            (State::Ready, Malformed, State::Ready),
            (State::Ready, Stop, Retiring),
            (Retiring, Event::Ready, Retiring),
            (Retiring, Suicide, Retiring),
            (Retiring, Malformed, Retiring),
            (Retiring, Stop, Retiring),
        ];
        for (state, event, expected) in table {
            assert_eq!(state.next(event), expected, "{state:?} + {event:?}");
        }
    }

    fn free_slot(table: &Table) -> usize {
        table.slots_to_fill(table.counted() + 1, &[], usize::MAX)[0]
    }

    fn table_of(n: i32) -> Table {
        let mut table = Table::default();
        for i in 0..n {
            let slot = free_slot(&table);
            table.insert(Worker::new(
                Pid::from_raw(100 + i),
                slot,
                Token(i as usize + 1),
                None,
            ));
        }
        table
    }

    fn apply(table: &mut Table, pid: i32, event: Event) {
        let worker = table.iter_mut().find(|w| w.pid == Pid::from_raw(pid)).unwrap();
        worker.state = worker.state.next(event);
    }

    #[test]
    fn suicide_asks_for_one_replacement_and_its_exit_for_none() {
        let mut table = table_of(3);
        apply(&mut table, 101, Event::Ready);
        assert_eq!(table.missing(3), 0);
        apply(&mut table, 101, Suicide);
        assert_eq!(table.missing(3), 1, "the replacement is due at once");
        table.insert(Worker::new(Pid::from_raw(200), free_slot(&table), Token(9), None));
        assert_eq!(table.missing(3), 0);
        table.remove(Pid::from_raw(101));
        assert_eq!(table.missing(3), 0, "the suicide's exit must not add a worker");
    }

    #[test]
    fn a_failed_start_is_replaced_at_its_exit_not_at_its_suicide() {
        let mut table = table_of(2);
        apply(&mut table, 100, Suicide);
        assert_eq!(table.missing(2), 0, "still counted until it exits");
        table.remove(Pid::from_raw(100));
        assert_eq!(table.missing(2), 1);
    }

    #[test]
    fn unannounced_exit_asks_for_a_replacement() {
        let mut table = table_of(3);
        apply(&mut table, 100, Event::Ready);
        table.remove(Pid::from_raw(100));
        assert_eq!(table.missing(3), 1);
    }

    #[test]
    fn stopping_workers_do_not_count() {
        let mut table = table_of(2);
        apply(&mut table, 100, Stop);
        apply(&mut table, 101, Stop);
        assert_eq!(table.missing(2), 2);
        assert_eq!(table.missing(0), 0);
    }

    #[test]
    fn a_replacement_does_not_take_a_retiring_workers_slot() {
        let mut table = table_of(2);
        apply(&mut table, 100, Event::Ready);
        apply(&mut table, 100, Suicide);
        assert_eq!(free_slot(&table), 2);
        table.remove(Pid::from_raw(100));
        assert_eq!(free_slot(&table), 0);
    }

    #[test]
    fn a_waiting_slot_keeps_its_vacancy() {
        // Slots 0 and 2 are held; slot 1's and slot 3's workers are gone,
        // and slot 3's died young: it waits.
        let mut table = table_of(4);
        table.remove(Pid::from_raw(101));
        table.remove(Pid::from_raw(103));
        let fill = |target, waiting: &[usize]| table.slots_to_fill(target, waiting, usize::MAX);
        assert_eq!(fill(4, &[3]), [1], "slot 1 is free and owes nothing; 3 waits");
        assert_eq!(fill(4, &[1, 3]), Vec::<usize>::new(), "both wait");
        assert_eq!(fill(4, &[]), [1, 3]);
        assert_eq!(fill(5, &[3]), [1, 4]);
        assert_eq!(fill(3, &[3]), [1], "after a TTOU, the waiting slot is not needed");
    }

    #[test]
    fn a_backoff_above_the_target_does_not_delay_a_refill() {
        // The case: slot_to_fill(2, [2]) with one worker in slot 1.
        let mut table = table_of(2);
        table.remove(Pid::from_raw(100));
        assert_eq!(table.slots_to_fill(2, &[2], usize::MAX), [0]);
    }

    #[test]
    fn forks_never_exceed_the_room() {
        let table = Table::default();
        assert_eq!(table.slots_to_fill(4, &[], 2), [0, 1]);
        assert_eq!(table.slots_to_fill(4, &[0], 2), [1, 2]);
        assert_eq!(table.slots_to_fill(4, &[], 0), Vec::<usize>::new());
    }

    #[test]
    fn retiring_workers_are_counted_apart() {
        let mut table = table_of(3);
        assert_eq!(table.retiring(), 0);
        apply(&mut table, 100, Stop);
        apply(&mut table, 101, Suicide);
        assert_eq!((table.counted(), table.retiring()), (2, 1), "101 never was ready");
        apply(&mut table, 102, Event::Ready);
        apply(&mut table, 102, Suicide);
        assert_eq!((table.counted(), table.retiring()), (1, 2));
    }

    #[test]
    fn stale_tokens_find_nobody() {
        let mut table = table_of(2);
        table.remove(Pid::from_raw(100));
        assert!(table.by_token(Token(1)).is_none());
        assert!(table.by_token(Token(2)).is_some());
    }

    #[test]
    fn the_nearest_kill_deadline_wins() {
        let mut table = table_of(3);
        for worker in table.iter_mut() {
            worker.state = State::Ready;
        }
        assert_eq!(table.next_deadline(None, None), None);
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        table.iter_mut().next().unwrap().kill_at = Some(later);
        table.iter_mut().last().unwrap().kill_at = Some(now);
        assert_eq!(table.next_deadline(None, None), Some(now));
        table.iter_mut().last().unwrap().killed = true;
        assert_eq!(
            table.next_deadline(None, None),
            Some(later),
            "a killed worker is only awaited"
        );
    }

    #[test]
    fn a_starting_worker_has_a_start_deadline() {
        let mut table = table_of(2);
        let timeout = Duration::from_secs(7);
        let first = table.iter().map(|w| w.spawned_at).min().unwrap();
        assert_eq!(table.next_deadline(Some(timeout), None), Some(first + timeout));
        assert_eq!(
            table.next_deadline(None, None),
            None,
            "no start timeout, no deadline"
        );
        for worker in table.iter_mut() {
            worker.state = worker.state.next(Event::Ready);
        }
        assert_eq!(
            table.next_deadline(Some(timeout), None),
            None,
            "ready: no start deadline"
        );
    }

    #[test]
    fn starting_outdated_oldest_and_newest_are_found() {
        let mut table = table_of(3);
        assert!(!table.is_empty());
        assert!(table.any_starting(), "all three are starting");
        for worker in table.iter_mut() {
            worker.state = worker.state.next(Event::Ready);
        }
        assert!(!table.any_starting());
        let now = Instant::now();
        for (i, worker) in table.iter_mut().enumerate() {
            worker.generation = i as u64; // 100: gen 0, 101: gen 1, 102: gen 2
            worker.spawned_at = now + Duration::from_secs(i as u64);
        }
        let since = |since| Wanted { image: 0, since };
        assert_eq!(table.outdated(since(0)), 0);
        assert_eq!(table.outdated(since(1)), 1, "only generations below 1");
        assert_eq!(table.outdated(since(2)), 2);
        assert_eq!(table.outdated(since(9)), 3);
        let other_image = Wanted { image: 1, since: 0 };
        assert_eq!(table.outdated(other_image), 3, "another program image");
        apply(&mut table, 100, Stop);
        assert_eq!(table.outdated(since(9)), 2, "a retiring worker is not outdated");
        let oldest = table.oldest_outdated(since(2)).map(|w| w.pid.as_raw());
        assert_eq!(oldest, Some(101), "100 retires already; 102 is current");
        assert_eq!(table.oldest_outdated(since(1)).map(|w| w.pid.as_raw()), None);
        assert_eq!(table.newest_counted().map(|w| w.pid.as_raw()), Some(102));
        apply(&mut table, 102, Suicide);
        assert_eq!(table.newest_counted().map(|w| w.pid.as_raw()), Some(101));
        table.remove(Pid::from_raw(100));
        table.remove(Pid::from_raw(101));
        table.remove(Pid::from_raw(102));
        assert!(table.is_empty());
        assert_eq!(table.newest_counted().map(|w| w.pid.as_raw()), None);
    }

    #[test]
    fn a_killed_starting_worker_has_no_start_deadline() {
        let mut table = table_of(1);
        let timeout = Some(Duration::from_secs(7));
        let worker = table.iter_mut().next().unwrap();
        assert!(worker.start_deadline(timeout).is_some());
        worker.killed = true;
        assert_eq!(worker.start_deadline(timeout), None, "only its exit is awaited");
    }

    #[test]
    fn free_slots_skip_every_held_slot() {
        let mut table = table_of(4);
        table.remove(Pid::from_raw(101));
        assert_eq!(table.free_slots().take(3).collect::<Vec<_>>(), [1, 4, 5]);
        assert_eq!(Table::default().free_slots().take(2).collect::<Vec<_>>(), [0, 1]);
    }
}
