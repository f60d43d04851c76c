//! Deadlines for the event loop: a binary heap with lazy cancellation.
//!
//! The loop asks `Timers::next_deadline` for its poll timeout and pops what
//! expired after each poll. Arming is O(log n); cancelling is O(1) and leaves
//! a stale heap entry behind, which is skipped when it reaches the top. So
//! that stale entries cannot pile up (a connection that arms a 300 s idle
//! timer and closes after a second leaves one behind), the heap is rebuilt
//! without them whenever they outnumber the live timers: amortised O(1) per
//! cancel. 10,000 armed timers cost one 24-byte heap slot and one slab entry
//! each.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use slab::Slab;

/// Names one armed timer. Returned when it is set, passed to the callback
/// when it fires, and used to cancel it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    key: u32,
    gen: u32,
}

/// How far ahead [`deadline`] puts a deadline that `Instant` cannot hold
/// (or that is further away than this anyway): about 100 years, which no
/// server runs for, so "after `Duration::MAX`" means "never" in practice
/// while staying an ordinary, comparable `Instant`.
pub const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `now + after`, saturating: never later than `now` + [`FAR_FUTURE`], so no
/// duration, however large (`Duration::MAX` included), makes the addition
/// overflow and panic. Every deadline the engines compute goes through
/// here.
pub fn deadline(now: Instant, after: Duration) -> Instant {
    now.checked_add(after.min(FAR_FUTURE)).unwrap_or(now)
}

/// The shortest period a repeating timer may have; shorter ones are raised
/// to it so a zero period cannot spin the loop.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct Entry<T> {
    gen: u32,
    at: Instant,
    period: Option<Duration>,
    payload: T,
}

/// A heap item; stale when its entry is gone, reused, or rescheduled.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    at: Instant,
    key: u32,
    gen: u32,
}

/// A set of armed timers carrying a payload each.
#[derive(Debug)]
pub(crate) struct Timers<T> {
    entries: Slab<Entry<T>>,
    heap: BinaryHeap<Reverse<Slot>>,
    next_gen: u32,
}

impl<T: Clone> Timers<T> {
    pub(crate) fn new() -> Timers<T> {
        Timers {
            entries: Slab::new(),
            heap: BinaryHeap::new(),
            next_gen: 0,
        }
    }

    /// Arms a timer that fires at `at`, then every `period` if given.
    pub(crate) fn insert(&mut self, at: Instant, period: Option<Duration>, payload: T) -> TimerId {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.insert_with_gen(at, period, payload, self.next_gen)
    }

    /// Like `insert`, with a generation from the caller: several timer sets
    /// that draw generations from one counter give out distinct ids.
    pub(crate) fn insert_with_gen(
        &mut self,
        at: Instant,
        period: Option<Duration>,
        payload: T,
        gen: u32,
    ) -> TimerId {
        let period = period.map(|p| p.max(MIN_PERIOD));
        let key = self.entries.insert(Entry {
            gen,
            at,
            period,
            payload,
        }) as u32;
        self.heap.push(Reverse(Slot { at, key, gen }));
        TimerId { key, gen }
    }

    /// Disarms a timer and returns its payload, or `None` if it is not armed.
    pub(crate) fn cancel(&mut self, id: TimerId) -> Option<T> {
        let key = id.key as usize;
        match self.entries.get(key) {
            Some(e) if e.gen == id.gen => {}
            _ => return None,
        }
        let payload = self.entries.remove(key).payload;
        if self.heap.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.heap.retain(|Reverse(s)| is_live(entries, s));
        }
        Some(payload)
    }

    /// The payload of an armed timer.
    #[cfg(test)]
    pub(crate) fn get(&self, id: TimerId) -> Option<&T> {
        self.entries
            .get(id.key as usize)
            .filter(|e| e.gen == id.gen)
            .map(|e| &e.payload)
    }

    /// Number of armed timers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// When the earliest armed timer fires.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        self.drop_stale_top();
        self.heap.peek().map(|Reverse(s)| s.at)
    }

    /// Pops one timer due at `now`. A repeating timer is re-armed one period
    /// later (or one period after `now`, if the loop fell behind, so that a
    /// stalled loop does not fire a burst of catch-up calls).
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(TimerId, T)> {
        self.drop_stale_top();
        let Reverse(top) = self.heap.peek()?;
        if top.at > now {
            return None;
        }
        let Reverse(Slot { key, gen, at }) = self.heap.pop()?;
        let id = TimerId { key, gen };
        let entry = &mut self.entries[key as usize];
        match entry.period {
            Some(period) => {
                let mut next = deadline(at, period);
                if next <= now {
                    next = deadline(now, period);
                }
                entry.at = next;
                self.heap.push(Reverse(Slot { at: next, key, gen }));
                Some((id, entry.payload.clone()))
            }
            None => Some((id, self.entries.remove(key as usize).payload)),
        }
    }

    fn drop_stale_top(&mut self) {
        while let Some(Reverse(top)) = self.heap.peek() {
            if is_live(&self.entries, top) {
                break;
            }
            self.heap.pop();
        }
    }
}

fn is_live<T>(entries: &Slab<Entry<T>>, s: &Slot) -> bool {
    matches!(entries.get(s.key as usize), Some(e) if e.gen == s.gen && e.at == s.at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn fires_in_deadline_order_once() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        timers.insert(t0 + ms(30), None, 'c');
        timers.insert(t0 + ms(10), None, 'a');
        timers.insert(t0 + ms(20), None, 'b');
        assert_eq!(timers.next_deadline(), Some(t0 + ms(10)));
        assert!(timers.pop_expired(t0 + ms(5)).is_none());
        let fired: Vec<char> = std::iter::from_fn(|| timers.pop_expired(t0 + ms(25)))
            .map(|(_, p)| p)
            .collect();
        assert_eq!(fired, ['a', 'b']);
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn cancelled_timer_never_fires_and_id_is_not_reused() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        let a = timers.insert(t0, None, 1);
        assert_eq!(timers.cancel(a), Some(1));
        assert_eq!(timers.cancel(a), None);
        let b = timers.insert(t0, None, 2); // same slab slot, new generation
        assert_ne!(a, b);
        assert_eq!(timers.cancel(a), None);
        assert_eq!(timers.get(b), Some(&2));
        assert_eq!(timers.pop_expired(t0), Some((b, 2)));
        assert!(timers.pop_expired(t0 + ms(100)).is_none());
    }

    #[test]
    fn periodic_rearms_and_skips_missed_ticks() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        let id = timers.insert(t0 + ms(10), Some(ms(10)), ());
        assert_eq!(timers.pop_expired(t0 + ms(10)).map(|p| p.0), Some(id));
        assert!(timers.pop_expired(t0 + ms(15)).is_none());
        // The loop stalled for 100 ms: one call, then the next is a period later.
        assert!(timers.pop_expired(t0 + ms(120)).is_some());
        assert!(timers.pop_expired(t0 + ms(120)).is_none());
        assert_eq!(timers.next_deadline(), Some(t0 + ms(130)));
    }

    #[test]
    fn deadlines_saturate_instead_of_overflowing() {
        let t0 = Instant::now();
        assert_eq!(deadline(t0, ms(5)), t0 + ms(5));
        assert_eq!(deadline(t0, Duration::MAX), t0 + FAR_FUTURE);
        let mut timers = Timers::new();
        timers.insert(deadline(t0, Duration::MAX), Some(Duration::MAX), ());
        timers.insert(t0, Some(Duration::MAX), ());
        assert!(timers.pop_expired(t0).is_some());
        assert!(timers.pop_expired(t0 + ms(1)).is_none());
    }

    #[test]
    fn zero_period_is_raised_to_the_minimum() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        timers.insert(t0, Some(Duration::ZERO), ());
        assert!(timers.pop_expired(t0).is_some());
        assert!(timers.pop_expired(t0).is_none());
    }

    #[test]
    fn stale_entries_are_compacted() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        for i in 0..10_000u64 {
            let id = timers.insert(t0 + ms(i), None, i);
            timers.cancel(id);
        }
        assert_eq!(timers.len(), 0);
        assert!(
            timers.heap.len() <= 64 + 1,
            "heap kept {}",
            timers.heap.len()
        );
    }
}
