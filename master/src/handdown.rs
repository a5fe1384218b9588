//! What a master hands to the image it re-executes as (upgrade.rs, step 3):
//! everything it knows, in a sealed memory file.
//!
//! The new image must carry on as if nothing happened: the same workers
//! with their pipes, states, ages and deadlines; the same target, build and
//! generation; the counters `metrics` shows, the uptime, every slot's
//! backoff and the restart history the give-up rule counts; the control
//! connections still open. So the state is written as text lines into a
//! memory file (`memfd_create`), sealed against any change
//! (F_SEAL_WRITE, SHRINK, GROW, SEAL), and only its fd number goes in the
//! environment (`RESPAWN_MASTER_STATE=7`). An environment string is
//! limited to 128 KiB by the kernel: about 3,000 workers' worth. The file
//! is limited by `MAX_BYTES`, far above what `SCOREBOARD_ROWS` workers need.
//!
//! Times are written as CLOCK_MONOTONIC nanoseconds, the clock `Instant`
//! reads on Linux, which an exec does not reset: an age or a deadline
//! handed down means the same moment to the new image, however long the
//! exec took.
//!
//! The new image reads the file as it would read input from outside: its
//! fd must be a sealed memory file, its size is bounded, every line is
//! parsed with checked arithmetic and every list has a bound, and any
//! fault makes the whole state unreadable (`Err`, one line, and the master
//! starts afresh) rather than half-adopted.

use crate::control::Pending;
use crate::master::SCOREBOARD_ROWS;
use crate::status::Counters;
use crate::table::State;
use respawn_ipc::scoreboard;
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The first line: what this is, and the version of its text. A master that
/// reads another version refuses the whole state.
const HEADER: &str = "respawn-master-state 2";
/// The most bytes a state may hold: 8,193 workers take about 0.8 MiB.
const MAX_BYTES: usize = 4 << 20;
/// The most restart times kept (the restart limit keeps max + 1).
const MAX_RESTARTS: usize = 100_000;
/// The most control connections handed down.
const MAX_CONNS: usize = 1024;
/// How far ahead a deadline handed down may lie: a longer one is cut to it.
const MAX_AHEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// Everything a master hands to its next image.
#[derive(Debug, PartialEq)]
pub(crate) struct MasterState {
    /// The image the new master is: the previous one's plus one.
    pub image: u32,
    pub target: usize,
    pub generation: u64,
    /// The generation the wanted build starts at.
    pub since: u64,
    /// The signal mask the program had before the master blocked its
    /// signals: what workers get back (the new image starts with them all
    /// blocked, and would otherwise take that for the program's own).
    pub signal_mask: u64,
    pub scoreboard: Option<(RawFd, usize)>,
    /// The control socket's listener, kept open so that no `respawn ctl`
    /// is refused while the master re-executes.
    pub control: Option<RawFd>,
    /// Open control connections: reading their request (None), or waiting
    /// for what they asked.
    pub conns: Vec<(RawFd, Option<Pending>)>,
    pub started: Instant,
    pub counters: Counters,
    /// Slots that back off: the slot, its delay, and until when it waits.
    pub backoff: Vec<(usize, Duration, Option<Instant>)>,
    pub restarts: Vec<Instant>,
    /// RELOADING=1 was sent and READY=1 is owed.
    pub reloading: bool,
    /// READY=1 was sent once already (the first workers were Ready).
    pub announced: bool,
    pub workers: Vec<AdoptedWorker>,
}

/// One live worker, as the next image must know it.
#[derive(Debug, PartialEq)]
pub(crate) struct AdoptedWorker {
    pub pid: i32,
    pub slot: usize,
    pub pipe: Option<RawFd>,
    pub image: u32,
    pub generation: u64,
    pub state: State,
    pub was_ready: bool,
    pub spawned_at: Instant,
    /// When it is SIGKILLed, if it is retiring.
    pub kill_at: Option<Instant>,
    pub killed: bool,
    pub hung: bool,
    /// Its own NOTIFY_SOCKET (`--ready-on-notify`), kept open.
    pub notify: Option<RawFd>,
}

/// One moment read on both clocks, to turn an `Instant` into monotonic
/// nanoseconds and back. Made once per encoding and once per decoding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    now: Instant,
    ns: u64,
}

impl Clock {
    pub(crate) fn now() -> Clock {
        Clock {
            now: Instant::now(),
            ns: scoreboard::now_ns(),
        }
    }

    fn ns(self, at: Instant) -> u64 {
        match at.checked_duration_since(self.now) {
            Some(ahead) => self.ns.saturating_add(nanos(ahead)),
            None => self.ns.saturating_sub(nanos(self.now - at)),
        }
    }

    /// The moment `ns` names; a time before what `Instant` can hold is
    /// taken as now, one too far ahead as `MAX_AHEAD` from now.
    fn instant(self, ns: u64) -> Instant {
        if ns <= self.ns {
            self.now
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.now)
        } else {
            let ahead = Duration::from_nanos(ns - self.ns).min(MAX_AHEAD);
            self.now.checked_add(ahead).unwrap_or(self.now)
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl MasterState {
    /// Every fd the state names.
    pub(crate) fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.scoreboard
            .map(|(fd, _)| fd)
            .into_iter()
            .chain(self.control)
            .chain(self.conns.iter().map(|(fd, _)| *fd))
            .chain(self.workers.iter().flat_map(|w| [w.pipe, w.notify]).flatten())
    }

    /// Writes the state into a new sealed memory file; its fd is
    /// close-on-exec until the caller hands it down.
    pub(crate) fn to_memfd(&self) -> io::Result<OwnedFd> {
        let text = self.encode(Clock::now());
        let name = c"respawn-master-state";
        // SAFETY: memfd_create reads the NUL-terminated name and returns a
        // new fd, which we own from here on.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this fd; nothing else owns it.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut written = 0;
        while written < text.len() {
            match nix::unistd::write(&file, &text.as_bytes()[written..]) {
                Ok(n) => written += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an integer and changes the file only.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// Reads the state from `file`, which must be a memory file sealed
    /// against writes, and parses it.
    pub(crate) fn from_memfd(file: &OwnedFd) -> Result<MasterState, String> {
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_WRITE == 0 {
            return Err("its fd is not a sealed memory file".to_owned());
        }
        let size = nix::sys::stat::fstat(file)
            .map_err(|errno| format!("its size: {errno}"))?
            .st_size;
        let size = usize::try_from(size).map_err(|_| "a negative size".to_owned())?;
        if size > MAX_BYTES {
            return Err(format!(
                "{size} bytes, more than the {MAX_BYTES} a state may hold"
            ));
        }
        let mut text = vec![0u8; size];
        let mut read = 0;
        while read < size {
            let offset = libc::off_t::try_from(read).map_err(|_| "too long".to_owned())?;
            let rest = &mut text[read..];
            // SAFETY: pread writes at most rest.len() bytes into rest.
            let n = unsafe { libc::pread(file.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), offset) };
            match n {
                0 => return Err(format!("it ended at byte {read} of {size}")),
                n if n > 0 => read += n as usize,
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return Err(format!("reading it: {}", io::Error::last_os_error())),
            }
        }
        let text = String::from_utf8(text).map_err(|_| "it is not text".to_owned())?;
        MasterState::decode(&text, Clock::now())
    }

    pub(crate) fn encode(&self, clock: Clock) -> String {
        let mut out = format!(
            "{HEADER}\nimage {}\ntarget {}\ngeneration {}\nsince {}\nmask {:x}\n",
            self.image, self.target, self.generation, self.since, self.signal_mask
        );
        if let Some((fd, rows)) = self.scoreboard {
            out.push_str(&format!("scoreboard {fd} {rows}\n"));
        }
        if let Some(fd) = self.control {
            out.push_str(&format!("control {fd}\n"));
        }
        for (fd, pending) in &self.conns {
            out.push_str(&format!("conn {fd} {}\n", pending_word(*pending)));
        }
        let c = &self.counters;
        out.push_str(&format!(
            "started {}\ncounters {} {} {} {} {} {} {}\nreloading {}\nannounced {}\n",
            clock.ns(self.started),
            c.failed_start,
            c.died,
            c.in_first_request,
            c.panicked,
            c.retired,
            c.hung,
            c.requests_of_the_gone,
            u8::from(self.reloading),
            u8::from(self.announced),
        ));
        for (slot, delay, until) in &self.backoff {
            let until = until.map_or("-".to_owned(), |at| clock.ns(at).to_string());
            out.push_str(&format!("backoff {slot} {} {until}\n", nanos(*delay)));
        }
        for at in &self.restarts {
            out.push_str(&format!("restart {}\n", clock.ns(*at)));
        }
        for w in &self.workers {
            let pipe = w.pipe.map_or("-".to_owned(), |fd| fd.to_string());
            let kill = w.kill_at.map_or("-".to_owned(), |at| clock.ns(at).to_string());
            let notify = w.notify.map_or("-".to_owned(), |fd| fd.to_string());
            out.push_str(&format!(
                "worker {} {} {pipe} {} {} {} {} {} {kill} {} {} {notify}\n",
                w.pid,
                w.slot,
                w.image,
                w.generation,
                state_word(w.state),
                u8::from(w.was_ready),
                clock.ns(w.spawned_at),
                u8::from(w.killed),
                u8::from(w.hung),
            ));
        }
        out.push_str("end\n");
        out
    }

    /// Parses what `encode` wrote. Any line it does not know, any value out
    /// of its range, an fd or a pid or a slot named twice, or a missing
    /// `end`: the whole state is refused, with the reason.
    pub(crate) fn decode(text: &str, clock: Clock) -> Result<MasterState, String> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, HEADER)) => {}
            Some((_, other)) => return Err(format!("it begins {:?}, not {HEADER:?}", shorten(other))),
            None => return Err("it is empty".to_owned()),
        }
        let mut state = MasterState {
            image: 0,
            target: 0,
            generation: 0,
            since: 0,
            signal_mask: 0,
            scoreboard: None,
            control: None,
            conns: Vec::new(),
            started: clock.now,
            counters: Counters::default(),
            backoff: Vec::new(),
            restarts: Vec::new(),
            reloading: false,
            announced: false,
            workers: Vec::new(),
        };
        let mut fds = Fds::default();
        let mut pids = HashSet::new();
        let mut slots = HashSet::new();
        let mut ended = false;
        for (number, line) in lines {
            if ended {
                return Err(format!("line {}: text after the end", number + 1));
            }
            let fault = |why: &str| format!("line {} ({:?}): {why}", number + 1, shorten(line));
            let mut words = line.split(' ');
            let key = words.next().unwrap_or_default();
            let words: Vec<&str> = words.collect();
            match (key, words.as_slice()) {
                ("image", [n]) => state.image = number_of(n).ok_or_else(|| fault("not an image number"))?,
                ("target", [n]) => {
                    state.target = number_of(n)
                        .filter(|&n: &usize| n <= crate::master::MAX_WORKERS)
                        .ok_or_else(|| fault("not a number of workers respawn supports"))?
                }
                ("generation", [n]) => {
                    state.generation = number_of(n).ok_or_else(|| fault("not a number"))?
                }
                ("since", [n]) => state.since = number_of(n).ok_or_else(|| fault("not a number"))?,
                ("mask", [bits]) => {
                    state.signal_mask = u64::from_str_radix(bits, 16).map_err(|_| fault("not a mask"))?
                }
                ("scoreboard", [fd, rows]) => {
                    let fd = fds.take(fd).ok_or_else(|| fault("not an fd of its own"))?;
                    let rows = number_of(rows).ok_or_else(|| fault("not a number of rows"))?;
                    state.scoreboard = Some((fd, rows));
                }
                ("control", [fd]) => {
                    state.control = Some(fds.take(fd).ok_or_else(|| fault("not an fd of its own"))?)
                }
                ("conn", [fd, pending]) if state.conns.len() < MAX_CONNS => {
                    let fd = fds.take(fd).ok_or_else(|| fault("not an fd of its own"))?;
                    let pending = pending_of_word(pending).ok_or_else(|| fault("not a request"))?;
                    state.conns.push((fd, pending));
                }
                ("started", [ns]) => {
                    state.started = clock.instant(number_of(ns).ok_or_else(|| fault("not a time"))?)
                }
                ("counters", [a, b, first, c, d, e, f]) => {
                    let n = |text: &str| number_of::<u64>(text).ok_or_else(|| fault("not a count"));
                    state.counters = Counters {
                        failed_start: n(a)?,
                        died: n(b)?,
                        in_first_request: n(first)?,
                        panicked: n(c)?,
                        retired: n(d)?,
                        hung: n(e)?,
                        requests_of_the_gone: n(f)?,
                    };
                }
                ("reloading", [flag]) => {
                    state.reloading = flag_of(flag).ok_or_else(|| fault("not 0 or 1"))?
                }
                ("announced", [flag]) => {
                    state.announced = flag_of(flag).ok_or_else(|| fault("not 0 or 1"))?
                }
                ("backoff", [slot, delay, until]) if state.backoff.len() < SCOREBOARD_ROWS => {
                    let slot = slot_of(slot).ok_or_else(|| fault("not a slot"))?;
                    let delay = Duration::from_nanos(number_of(delay).ok_or_else(|| fault("not a delay"))?);
                    let until = optional(until, |ns| number_of(ns).map(|ns| clock.instant(ns)))
                        .ok_or_else(|| fault("not a time"))?;
                    state.backoff.push((slot, delay, until));
                }
                ("restart", [ns]) if state.restarts.len() < MAX_RESTARTS => {
                    state
                        .restarts
                        .push(clock.instant(number_of(ns).ok_or_else(|| fault("not a time"))?));
                }
                (
                    "worker",
                    [pid, slot, pipe, image, generation, st, ready, spawned, kill, killed, hung, notify],
                ) if state.workers.len() < SCOREBOARD_ROWS => {
                    let pid: i32 = number_of(pid)
                        .filter(|&pid| pid > 1)
                        .ok_or_else(|| fault("not a pid"))?;
                    let slot = slot_of(slot).ok_or_else(|| fault("not a slot"))?;
                    if !pids.insert(pid) || !slots.insert(slot) {
                        return Err(fault("a pid or a slot named twice"));
                    }
                    let pipe =
                        optional(pipe, |fd| fds.take(fd)).ok_or_else(|| fault("not an fd of its own"))?;
                    let notify =
                        optional(notify, |fd| fds.take(fd)).ok_or_else(|| fault("not an fd of its own"))?;
                    let time = |ns: &str| number_of(ns).map(|ns| clock.instant(ns));
                    state.workers.push(AdoptedWorker {
                        pid,
                        slot,
                        pipe,
                        image: number_of(image).ok_or_else(|| fault("not an image"))?,
                        generation: number_of(generation).ok_or_else(|| fault("not a generation"))?,
                        state: state_of(st).ok_or_else(|| fault("not a state"))?,
                        was_ready: flag_of(ready).ok_or_else(|| fault("not 0 or 1"))?,
                        spawned_at: time(spawned).ok_or_else(|| fault("not a time"))?,
                        kill_at: optional(kill, time).ok_or_else(|| fault("not a time"))?,
                        killed: flag_of(killed).ok_or_else(|| fault("not 0 or 1"))?,
                        hung: flag_of(hung).ok_or_else(|| fault("not 0 or 1"))?,
                        notify,
                    });
                }
                ("end", []) => ended = true,
                _ => return Err(fault("not a line of a state, or one too many")),
            }
        }
        if !ended {
            return Err("it has no end line: it was cut short".to_owned());
        }
        Ok(state)
    }
}

/// The fds a state names: each at most once, and none of stdin, stdout
/// and stderr, so that no two owners ever close one fd.
#[derive(Default)]
struct Fds(HashSet<RawFd>);

impl Fds {
    fn take(&mut self, text: &str) -> Option<RawFd> {
        let fd: RawFd = number_of(text).filter(|&fd| fd > 2)?;
        self.0.insert(fd).then_some(fd)
    }
}

fn number_of<T: std::str::FromStr>(text: &str) -> Option<T> {
    // Digits only: no sign, no space, no `+`.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn slot_of(text: &str) -> Option<usize> {
    number_of(text).filter(|&slot| slot < SCOREBOARD_ROWS)
}

fn flag_of(text: &str) -> Option<bool> {
    match text {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// `-` for none, else what `parse` makes of it (None: a fault).
fn optional<T>(text: &str, mut parse: impl FnMut(&str) -> Option<T>) -> Option<Option<T>> {
    match text {
        "-" => Some(None),
        text => parse(text).map(Some),
    }
}

fn state_word(state: State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Ready => "ready",
        State::Retiring => "retiring",
    }
}

fn state_of(text: &str) -> Option<State> {
    match text {
        "starting" => Some(State::Starting),
        "ready" => Some(State::Ready),
        "retiring" => Some(State::Retiring),
        _ => None,
    }
}

fn pending_word(pending: Option<Pending>) -> String {
    match pending {
        None => "-".to_owned(),
        Some(Pending::Scale(n)) => format!("scale:{n}"),
        Some(Pending::Reload) => "reload".to_owned(),
        Some(Pending::Upgrade) => "upgrade".to_owned(),
        Some(Pending::Stop) => "stop".to_owned(),
    }
}

/// None: not a word `pending_word` writes; Some(None): a reading connection.
fn pending_of_word(text: &str) -> Option<Option<Pending>> {
    Some(match text {
        "-" => None,
        "reload" => Some(Pending::Reload),
        "upgrade" => Some(Pending::Upgrade),
        "stop" => Some(Pending::Stop),
        other => Some(Pending::Scale(number_of(other.strip_prefix("scale:")?)?)),
    })
}

/// A line as a log line may show it: at most 60 characters.
fn shorten(line: &str) -> String {
    line.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(clock: Clock) -> MasterState {
        let now = clock.now;
        MasterState {
            image: 2,
            target: 4,
            generation: 7,
            since: 6,
            signal_mask: 0x4002,
            scoreboard: Some((6, SCOREBOARD_ROWS)),
            control: Some(9),
            conns: vec![
                (20, None),
                (21, Some(Pending::Scale(3))),
                (22, Some(Pending::Upgrade)),
            ],
            started: now - Duration::from_secs(100),
            counters: Counters {
                failed_start: 1,
                died: 2,
                in_first_request: 7,
                panicked: 3,
                retired: 4,
                hung: 5,
                requests_of_the_gone: 303,
            },
            backoff: vec![(
                1,
                Duration::from_millis(400),
                Some(now + Duration::from_millis(250)),
            )],
            restarts: vec![now - Duration::from_secs(3), now - Duration::from_secs(1)],
            reloading: true,
            announced: true,
            workers: vec![
                AdoptedWorker {
                    pid: 1234,
                    slot: 0,
                    pipe: Some(11),
                    image: 2,
                    generation: 7,
                    state: State::Ready,
                    was_ready: true,
                    spawned_at: now - Duration::from_millis(2500),
                    kill_at: None,
                    killed: false,
                    hung: false,
                    notify: Some(12),
                },
                AdoptedWorker {
                    pid: 1200,
                    slot: 5,
                    pipe: None,
                    image: 1,
                    generation: 6,
                    state: State::Retiring,
                    was_ready: true,
                    spawned_at: now - Duration::from_secs(90),
                    kill_at: Some(now + Duration::from_secs(29)),
                    killed: false,
                    hung: true,
                    notify: None,
                },
            ],
        }
    }

    #[test]
    fn every_fd_the_state_names_is_listed() {
        let clock = Clock::now();
        let mut fds: Vec<RawFd> = state(clock).fds().collect();
        fds.sort_unstable();
        assert_eq!(
            fds,
            [6, 9, 11, 12, 20, 21, 22],
            "scoreboard, control, a pipe, a notification socket, three connections"
        );
    }

    #[test]
    fn the_state_round_trips_with_its_times() {
        let clock = Clock::now();
        let state = state(clock);
        assert_eq!(MasterState::decode(&state.encode(clock), clock), Ok(state));
    }

    #[test]
    fn times_mean_the_same_moment_however_long_the_exec_took() {
        let before = Clock::now();
        let state = state(before);
        // The new image reads it 1.5 s later: the same instants, so ages
        // are 1.5 s longer and deadlines 1.5 s nearer, as they are.
        let later = Clock {
            now: before.now + Duration::from_millis(1500),
            ns: before.ns + 1_500_000_000,
        };
        let read = MasterState::decode(&state.encode(before), later).expect("readable");
        assert_eq!(read.workers[0].spawned_at, state.workers[0].spawned_at);
        assert_eq!(read.workers[1].kill_at, state.workers[1].kill_at);
        assert_eq!(read.started, state.started);
    }

    #[test]
    fn a_sealed_memfd_carries_it_and_anything_else_is_refused() {
        let clock = Clock::now();
        let state = state(clock);
        let file = state.to_memfd().expect("a memfd");
        let read = MasterState::from_memfd(&file).expect("readable");
        assert_eq!(read.workers.len(), 2);
        assert_eq!(read.counters.requests_of_the_gone, 303);
        let err = nix::unistd::write(&file, b"x").expect_err("sealed against writes");
        assert_eq!(err, nix::errno::Errno::EPERM);
        let (plain, _) = nix::unistd::pipe().expect("a pipe");
        let err = MasterState::from_memfd(&plain).unwrap_err();
        assert_eq!(err, "its fd is not a sealed memory file");
    }

    #[test]
    fn thousands_of_workers_fit() {
        let clock = Clock::now();
        let mut big = state(clock);
        big.workers = (0..SCOREBOARD_ROWS)
            .map(|i| AdoptedWorker {
                pid: 100_000 + i as i32,
                slot: i,
                pipe: Some(1000 + i as i32),
                image: 3,
                generation: 99,
                state: State::Ready,
                was_ready: true,
                spawned_at: clock.now,
                kill_at: Some(clock.now + Duration::from_secs(30)),
                killed: false,
                hung: false,
                notify: None,
            })
            .collect();
        let text = big.encode(clock);
        assert!(text.len() < MAX_BYTES / 4, "{} bytes", text.len());
        assert!(
            text.len() > 128 * 1024,
            "more than an environment string may hold"
        );
        let file = big.to_memfd().expect("a memfd");
        assert_eq!(
            MasterState::from_memfd(&file).map(|s| s.workers.len()),
            Ok(SCOREBOARD_ROWS)
        );
    }

    #[test]
    fn garbage_is_refused_whole_with_the_reason() {
        let clock = Clock::now();
        let good = state(clock).encode(clock);
        let with = |from: &str, to: &str| good.replacen(from, to, 1);
        let cases = [
            (String::new(), "it is empty"),
            ("respawn-master-state 1\nend\n".to_owned(), "it begins"),
            (with("end\n", ""), "it has no end line"),
            (with("end\n", "end\nimage 3\n"), "text after the end"),
            (with("target 4", "target 99999"), "not a number of workers"),
            (with("target 4", "target -4"), "not a number of workers"),
            (
                with("generation 7", "generation 99999999999999999999999"),
                "not a number",
            ),
            (
                with("worker 1200 5", "worker 1234 5"),
                "a pid or a slot named twice",
            ),
            (
                with("worker 1200 5", "worker 1200 0"),
                "a pid or a slot named twice",
            ),
            (with("worker 1200 5", "worker 1200 99999"), "not a slot"),
            (with("worker 1200", "worker 1"), "not a pid"),
            (with("conn 20", "conn 9"), "not an fd of its own"),
            (with("conn 20", "conn 2"), "not an fd of its own"),
            (with("control 9", "control x"), "not an fd of its own"),
            (with("conn 20 -", "conn 20 reboot"), "not a request"),
            (with("reloading 1", "reloading 2"), "not 0 or 1"),
            (with("image 2", "image 2 3"), "not a line of a state"),
            (with("image 2", "rm -rf /"), "not a line of a state"),
        ];
        for (text, why) in cases {
            let err = MasterState::decode(&text, clock).unwrap_err();
            assert!(err.contains(why), "{why:?} not in {err:?}");
        }
    }

    #[test]
    fn a_file_too_big_or_not_sealed_against_writes_is_refused() {
        let sealed = |bytes: usize, seals: libc::c_int| {
            let name = c"test-state";
            // SAFETY: memfd_create reads the NUL-terminated name; the fd is ours.
            let fd =
                unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
            assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
            // SAFETY: just made, owned here alone.
            let file = unsafe { OwnedFd::from_raw_fd(fd) };
            nix::unistd::ftruncate(&file, bytes as libc::off_t).expect("ftruncate");
            // SAFETY: F_ADD_SEALS changes the file's seals only.
            assert_eq!(
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) },
                0
            );
            file
        };
        let err = MasterState::from_memfd(&sealed(MAX_BYTES + 1, libc::F_SEAL_WRITE)).unwrap_err();
        assert!(err.contains("more than the"), "{err}");
        let err = MasterState::from_memfd(&sealed(10, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)).unwrap_err();
        assert_eq!(err, "its fd is not a sealed memory file");
        let err = MasterState::from_memfd(&sealed(MAX_BYTES, libc::F_SEAL_WRITE)).unwrap_err();
        assert!(
            err.starts_with("it begins "),
            "exactly the bound is read, and judged: {err}"
        );
    }

    #[test]
    fn every_list_has_a_bound() {
        let clock = Clock::now();
        let with_lines = |line: &dyn Fn(usize) -> String, count: usize| {
            let mut text = format!("{HEADER}\n");
            for i in 0..count {
                text.push_str(&line(i));
                text.push('\n');
            }
            text.push_str("end\n");
            MasterState::decode(&text, clock)
        };
        let conn = |i: usize| format!("conn {} -", 3 + i);
        assert!(with_lines(&conn, MAX_CONNS).is_ok());
        assert!(with_lines(&conn, MAX_CONNS + 1)
            .unwrap_err()
            .contains("one too many"));
        let backoff = |i: usize| format!("backoff {} 1000 -", i % SCOREBOARD_ROWS);
        assert!(with_lines(&backoff, SCOREBOARD_ROWS).is_ok());
        assert!(with_lines(&backoff, SCOREBOARD_ROWS + 1)
            .unwrap_err()
            .contains("one too many"));
        let restart = |i: usize| format!("restart {i}");
        assert!(with_lines(&restart, MAX_RESTARTS).is_ok());
        assert!(with_lines(&restart, MAX_RESTARTS + 1)
            .unwrap_err()
            .contains("one too many"));
        let worker = |i: usize| format!("worker {} {i} - 0 0 ready 1 0 - 0 0 -", 100 + i);
        assert!(with_lines(&worker, SCOREBOARD_ROWS).is_ok());
    }

    #[test]
    fn numbers_are_digits_only_and_slots_below_the_rows() {
        assert_eq!(number_of::<u64>("+4"), None);
        assert_eq!(number_of::<u64>(""), None);
        assert_eq!(number_of::<u64>(" 4"), None);
        assert_eq!(number_of::<u64>("4"), Some(4));
        assert_eq!(
            slot_of(&(SCOREBOARD_ROWS - 1).to_string()),
            Some(SCOREBOARD_ROWS - 1)
        );
        assert_eq!(slot_of(&SCOREBOARD_ROWS.to_string()), None);
    }

    #[test]
    fn far_times_are_clamped_not_overflowed() {
        let clock = Clock::now();
        assert!(
            clock.instant(0) <= clock.now,
            "the boot, or as far back as an Instant goes"
        );
        let far = clock.instant(u64::MAX);
        assert_eq!(
            far,
            clock.now + Duration::from_secs(7 * 24 * 3600),
            "a week ahead at most"
        );
    }
}
