//! Admission: how many migrations this host runs at once in each direction, and the queue of
//! those waiting for a slot (Nova's `max_concurrent_live_migrations`, KubeVirt's
//! `parallelOutboundMigrationsPerNode`). A migration beyond the limit waits, in order, with
//! its place in `status` (`queued`, `queue_position`), rather than being refused; only a
//! full queue, or a wait past its bound, refuses.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::migrate::{MigrationStatus, Phase};

/// How often a waiting migration looks at its abort flag and refreshes its place.
const LOOK: Duration = Duration::from_millis(100);

/// The limits of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most migrations running at once; 0: no limit.
    pub running: usize,
    /// Most waiting for a slot; beyond, refused.
    pub queue: usize,
}

/// One direction's slots and queue.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    /// Tickets of the waiting migrations, first in line first.
    queue: VecDeque<u64>,
    next_ticket: u64,
}

/// A slot, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().expect("admission lock");
        st.running -= 1;
        drop(st);
        self.gate.changed.notify_all();
    }
}

/// Why a migration was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The queue is full.
    #[error(
        "{running} migrations run here (the limit) and {queue} wait already (the queue's limit); try again later"
    )]
    QueueFull {
        /// Running.
        running: usize,
        /// Waiting.
        queue: usize,
    },
    /// It waited its longest.
    #[error("waited {0} s for a slot; this host is still busy")]
    Waited(u64),
    /// The operator aborted it while it waited.
    #[error("aborted while queued")]
    Aborted,
}

impl Gate {
    /// A gate with these limits.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Gate {
            limits,
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    /// Migrations running now.
    pub fn running(&self) -> usize {
        self.state.lock().expect("admission lock").running
    }

    /// Migrations waiting now.
    pub fn queued(&self) -> usize {
        self.state.lock().expect("admission lock").queue.len()
    }

    /// Takes a slot, waiting in line if there is none: `status` shows `queued` and its place
    /// meanwhile (and goes back to the phase it had once admitted). Gives up when `abort` is
    /// set or after `wait` (if bounded).
    pub fn acquire(
        self: &Arc<Self>,
        status: &Mutex<MigrationStatus>,
        abort: &AtomicBool,
        wait: Option<Duration>,
    ) -> Result<Permit, Refused> {
        let mut st = self.state.lock().expect("admission lock");
        let free = |st: &State| self.limits.running == 0 || st.running < self.limits.running;
        if st.queue.is_empty() && free(&st) {
            st.running += 1;
            return Ok(Permit { gate: self.clone() });
        }
        if st.queue.len() >= self.limits.queue {
            return Err(Refused::QueueFull {
                running: st.running,
                queue: st.queue.len(),
            });
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(ticket);
        let was = status.lock().expect("status lock").phase;
        let since = Instant::now();
        let outcome = loop {
            let place = st.queue.iter().position(|&t| t == ticket).expect("in line");
            if place == 0 && free(&st) {
                st.running += 1;
                break Ok(Permit { gate: self.clone() });
            }
            {
                let mut s = status.lock().expect("status lock");
                s.phase = Phase::Queued;
                s.job.queue_position = u32::try_from(place + 1).ok();
            }
            if abort.load(Ordering::Relaxed) {
                break Err(Refused::Aborted);
            }
            if let Some(w) = wait
                && since.elapsed() >= w
            {
                break Err(Refused::Waited(w.as_secs()));
            }
            st = self
                .changed
                .wait_timeout(st, LOOK)
                .expect("admission lock")
                .0;
        };
        st.queue.retain(|&t| t != ticket);
        drop(st);
        // The next in line may go now (or moved up a place).
        self.changed.notify_all();
        let mut s = status.lock().expect("status lock");
        s.job.queue_position = None;
        if s.phase == Phase::Queued {
            s.phase = was;
        }
        outcome
    }
}

impl Gate {
    /// Why a migration arriving now would be refused at once, if it would: the queue is
    /// full. (Checked before a migration is set up; `acquire` checks again.)
    pub fn would_refuse(&self) -> Option<Refused> {
        let st = self.state.lock().expect("admission lock");
        let free = self.limits.running == 0 || st.running < self.limits.running;
        (!(st.queue.is_empty() && free) && st.queue.len() >= self.limits.queue).then_some(
            Refused::QueueFull {
                running: st.running,
                queue: st.queue.len(),
            },
        )
    }
}

/// Ends the status of a migration that was never admitted, and says why.
pub fn not_admitted(refused: &Refused, status: &Mutex<MigrationStatus>) -> String {
    let mut s = status.lock().expect("status lock");
    s.phase = if *refused == Refused::Aborted {
        Phase::Aborted
    } else {
        Phase::Failed
    };
    s.error = Some(format!("admission: {refused}"));
    s.job.ended_at_ms = Some(crate::migrate::job_stats::unix_ms());
    s.error.clone().unwrap_or_default()
}

/// This host's two gates.
#[derive(Debug)]
pub struct Admission {
    /// Migrations sent from here.
    pub outbound: Arc<Gate>,
    /// Migrations received here.
    pub inbound: Arc<Gate>,
    /// Longest an incoming migration waits (its source waits for the answer meanwhile).
    pub inbound_wait: Duration,
}

impl Admission {
    /// Gates with these limits.
    pub fn new(outbound: Limits, inbound: Limits, inbound_wait: Duration) -> Self {
        Admission {
            outbound: Gate::new(outbound),
            inbound: Gate::new(inbound),
            inbound_wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::Role;

    fn status() -> Arc<Mutex<MigrationStatus>> {
        Arc::new(Mutex::new(MigrationStatus::new(1, Role::Source, "g", 1)))
    }

    #[test]
    fn beyond_the_limit_a_migration_waits_in_line_and_goes_when_a_slot_frees() {
        let gate = Gate::new(Limits {
            running: 1,
            queue: 2,
        });
        let never = AtomicBool::new(false);
        let first = gate.acquire(&status(), &never, None).unwrap();
        let (s2, s3) = (status(), status());
        let (tx, rx) = crossbeam_channel::unbounded();
        let waiters: Vec<_> = [(2_usize, s2.clone()), (3, s3.clone())]
            .into_iter()
            .map(|(n, s)| {
                let (gate, tx) = (gate.clone(), tx.clone());
                // The second waiter joins only once the first is in line: the order is known.
                let joined = (n, gate.clone());
                let t = std::thread::spawn(move || {
                    let p = gate.acquire(&s, &AtomicBool::new(false), None).unwrap();
                    tx.send(n).unwrap();
                    p
                });
                while joined.1.queued() < n - 1 {
                    std::thread::yield_now();
                }
                t
            })
            .collect();
        // Both show their place once they looked.
        while s3.lock().unwrap().job.queue_position != Some(2) {
            std::thread::yield_now();
        }
        assert_eq!(s2.lock().unwrap().job.queue_position, Some(1));
        assert_eq!(s2.lock().unwrap().phase, Phase::Queued);
        // A fourth finds the queue full and is refused at once.
        let full = gate.acquire(&status(), &never, None).unwrap_err();
        assert!(
            matches!(
                full,
                Refused::QueueFull {
                    running: 1,
                    queue: 2
                }
            ),
            "{full}"
        );
        assert!(rx.try_recv().is_err(), "nobody passed the full slot");
        drop(first);
        assert_eq!(rx.recv().unwrap(), 2, "first in line goes first");
        let p2 = waiters.into_iter().next().unwrap().join().unwrap();
        assert_eq!(s2.lock().unwrap().phase, Phase::Connecting);
        assert_eq!(s2.lock().unwrap().job.queue_position, None);
        assert!(rx.try_recv().is_err(), "one slot, one migration");
        drop(p2);
        assert_eq!(rx.recv().unwrap(), 3);
    }

    #[test]
    fn a_queued_migration_can_be_aborted_or_give_up_waiting() {
        let gate = Gate::new(Limits {
            running: 1,
            queue: 4,
        });
        let _held = gate
            .acquire(&status(), &AtomicBool::new(false), None)
            .unwrap();
        let aborted = AtomicBool::new(true);
        assert_eq!(
            gate.acquire(&status(), &aborted, None).unwrap_err(),
            Refused::Aborted
        );
        let e = gate
            .acquire(&status(), &AtomicBool::new(false), Some(Duration::ZERO))
            .unwrap_err();
        assert_eq!(e, Refused::Waited(0));
        assert_eq!(gate.queued(), 0, "who left the line is out of it");
        assert_eq!(gate.running(), 1);
    }

    #[test]
    fn no_limit_means_no_queue() {
        let gate = Gate::new(Limits {
            running: 0,
            queue: 0,
        });
        let never = AtomicBool::new(false);
        let permits: Vec<_> = (0..50)
            .map(|_| gate.acquire(&status(), &never, None).unwrap())
            .collect();
        assert_eq!(gate.running(), 50);
        drop(permits);
        assert_eq!(gate.running(), 0);
    }
}
