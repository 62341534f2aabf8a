//! One group's Synchronized Arrival, without I/O: members report, the group answers.
//!
//! A member becomes *ready* when its own stop policy would stop it (the dirtied-at-least-
//! sent phase, a local minimum, its downtime budget). The group holds every ready member
//! until all are ready, then lets them all go: each stops at its next iteration end, so the
//! switchovers land within one iteration of each other (paper IV-B4). A member that fails
//! or is aborted releases the others, which then follow the group's failure policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the others do when a member fails or is aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GroupFailure {
    /// Abort too: the application moves whole or not at all.
    #[default]
    Abort,
    /// Carry on alone, each stopping when its own policy says.
    Continue,
}

impl std::str::FromStr for GroupFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "abort" => Ok(GroupFailure::Abort),
            "continue" => Ok(GroupFailure::Continue),
            _ => Err(format!("{s:?}: use abort or continue")),
        }
    }
}

/// One iteration's figures, as a member reports them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// Iteration just finished.
    pub iteration: u32,
    /// Pages it sent.
    pub sent: u64,
    /// Pages dirtied meanwhile.
    pub dirtied: u64,
    /// Pages the next iteration would send.
    pub remaining: u64,
    /// Estimated final copy (the pause), milliseconds.
    pub final_copy_ms: Option<u64>,
    /// How long the iteration took, milliseconds.
    pub iteration_ms: u64,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
    /// Its own policy would stop now.
    pub ready: bool,
}

/// The group's answer to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Keep iterating (not everyone is ready).
    Hold,
    /// Stop now: everyone is ready.
    Go,
    /// Another member failed and the group aborts: abort.
    Abort,
    /// Another member failed and the group continues: follow your own policy from now on.
    Alone,
}

/// Where a member stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Iterating, not yet ready.
    Iterating,
    /// Ready, held for the others.
    Held,
    /// Told to stop.
    Stopping,
    /// Committed.
    Done,
    /// Failed or aborted, with why.
    Failed(String),
}

/// One member, as `skyferry status --group` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Its name (the guest's).
    pub name: String,
    /// Guest pages.
    pub pages: u64,
    /// Where it stands.
    pub state: MemberState,
    /// Its last report.
    pub last: Progress,
    /// Milliseconds since the group formed, at its first ready report.
    pub ready_at_ms: Option<u64>,
    /// Milliseconds since the group formed, when it was told to stop.
    pub go_at_ms: Option<u64>,
    /// Milliseconds since the group formed, when it committed.
    pub done_at_ms: Option<u64>,
    /// Iterations it ran while held.
    pub held_iterations: u32,
    /// Bytes it sent while held.
    pub held_bytes: u64,
    /// Waits it spent paced instead of iterating while held.
    pub paced_waits: u32,
    /// Bytes pacing saved: each paced wait stands for one iteration it did not run, costed
    /// at its average held iteration.
    pub paced_saved_bytes: u64,
}

/// A group of migrations that arrive together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// What members do when one fails.
    pub on_failure: GroupFailure,
    /// Members expected (the largest size any member declared): the group waits for them
    /// all to join before it lets anyone go.
    pub expected: usize,
    /// Members, by name.
    pub members: BTreeMap<String, Member>,
    /// Everyone was ready: members are let go.
    pub go: bool,
    /// A member failed; why.
    pub broken: Option<String>,
    /// When the first member joined, on the coordinator's clock: every `*_at_ms` counts
    /// from here.
    #[serde(skip)]
    formed_ms: u64,
}

impl Group {
    /// An empty group, formed at `now_ms` on the coordinator's clock.
    pub fn new(name: &str, on_failure: GroupFailure, now_ms: u64) -> Self {
        Group {
            name: name.to_string(),
            on_failure,
            expected: 0,
            members: BTreeMap::new(),
            go: false,
            broken: None,
            formed_ms: now_ms,
        }
    }

    /// A member joins (or rejoins, replacing its old entry), declaring how many members the
    /// group has (0: as many as have joined when all of them are ready).
    pub fn join(&mut self, name: &str, pages: u64, size: usize) {
        self.expected = self.expected.max(size);
        self.members.insert(
            name.to_string(),
            Member {
                name: name.to_string(),
                pages,
                state: MemberState::Iterating,
                last: Progress::default(),
                ready_at_ms: None,
                go_at_ms: None,
                done_at_ms: None,
                held_iterations: 0,
                held_bytes: 0,
                paced_waits: 0,
                paced_saved_bytes: 0,
            },
        );
    }

    /// A member reports an iteration at `now_ms`; the answer says what it does next.
    pub fn report(&mut self, name: &str, p: Progress, now_ms: u64) -> Verdict {
        let at = now_ms.saturating_sub(self.formed_ms);
        if let Some(v) = self.after_failure() {
            return v;
        }
        let Some(m) = self.members.get_mut(name) else {
            return Verdict::Abort; // not a member: nothing to wait for, never stop blind
        };
        let wire_delta = p.wire_bytes.saturating_sub(m.last.wire_bytes);
        if matches!(m.state, MemberState::Held) {
            m.held_iterations += 1;
            // The figures are the member's word: a counter that drops and climbs again (a
            // restarted member, or a hostile one) must not overflow the coordinator's sum.
            m.held_bytes = m.held_bytes.saturating_add(wire_delta);
        }
        m.last = p;
        if p.ready && m.ready_at_ms.is_none() {
            m.ready_at_ms = Some(at);
        }
        if p.ready && matches!(m.state, MemberState::Iterating) {
            m.state = MemberState::Held;
        }
        if !self.go
            && self.members.len() >= self.expected
            && self.members.values().all(|m| m.ready_at_ms.is_some())
        {
            self.go = true;
        }
        self.verdict(name, now_ms)
    }

    /// What `name` does now (after a report or a paced wait).
    pub fn verdict(&mut self, name: &str, now_ms: u64) -> Verdict {
        let at = now_ms.saturating_sub(self.formed_ms);
        if let Some(v) = self.after_failure() {
            return v;
        }
        let go = self.go;
        let Some(m) = self.members.get_mut(name) else {
            return Verdict::Abort;
        };
        if go && m.ready_at_ms.is_some() {
            if m.go_at_ms.is_none() {
                m.go_at_ms = Some(at);
                m.state = MemberState::Stopping;
            }
            Verdict::Go
        } else {
            Verdict::Hold
        }
    }

    /// A held member waited instead of iterating.
    pub fn paced(&mut self, name: &str) {
        if let Some(m) = self.members.get_mut(name) {
            m.paced_waits += 1;
            let per_iteration = m.held_bytes.checked_div(u64::from(m.held_iterations));
            // Saturating: `pages` and the byte counts are the member's word (both the product
            // and the sum overflowed on inputs replayed through the `control` fuzz target).
            let guest_bytes = m.pages.saturating_mul(4096);
            m.paced_saved_bytes = m
                .paced_saved_bytes
                .saturating_add(per_iteration.unwrap_or(m.last.wire_bytes.min(guest_bytes)));
        }
    }

    /// A member committed.
    pub fn done(&mut self, name: &str, now_ms: u64) {
        if let Some(m) = self.members.get_mut(name) {
            m.state = MemberState::Done;
            m.done_at_ms = Some(now_ms.saturating_sub(self.formed_ms));
        }
    }

    /// A member failed or was aborted: the others are released.
    pub fn fail(&mut self, name: &str, why: &str) {
        if let Some(m) = self.members.get_mut(name) {
            m.state = MemberState::Failed(why.to_string());
        }
        if self.broken.is_none() && !self.go {
            self.broken = Some(format!("{name}: {why}"));
        }
    }

    fn after_failure(&self) -> Option<Verdict> {
        self.broken.as_ref().map(|_| match self.on_failure {
            GroupFailure::Abort => Verdict::Abort,
            GroupFailure::Continue => Verdict::Alone,
        })
    }

    /// Milliseconds between the first and the last member told to stop (how close the
    /// switchovers land), once all were.
    pub fn go_spread_ms(&self) -> Option<u64> {
        let gos: Vec<u64> = self.members.values().filter_map(|m| m.go_at_ms).collect();
        (gos.len() == self.members.len() && !gos.is_empty())
            .then(|| gos.iter().max().unwrap() - gos.iter().min().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(iteration: u32, ready: bool, wire: u64) -> Progress {
        Progress {
            iteration,
            sent: 100,
            dirtied: 50,
            remaining: 50,
            final_copy_ms: Some(5),
            iteration_ms: 10,
            wire_bytes: wire,
            ready,
        }
    }

    #[test]
    fn ready_members_are_held_until_all_are_ready_then_all_go() {
        let mut g = Group::new("app", GroupFailure::Abort, 0);
        g.join("web", 10, 3);
        g.join("db", 100, 0);
        assert_eq!(g.report("web", p(1, false, 10), 1), Verdict::Hold);
        assert_eq!(g.report("web", p(2, true, 20), 2), Verdict::Hold);
        assert_eq!(g.members["web"].state, MemberState::Held);
        assert_eq!(g.report("web", p(3, true, 30), 3), Verdict::Hold);
        assert_eq!(g.members["web"].held_iterations, 1);
        assert_eq!(g.members["web"].held_bytes, 10);
        assert_eq!(g.report("db", p(1, false, 100), 4), Verdict::Hold);
        // All ready, but a third member was announced and has not joined yet.
        assert_eq!(g.report("db", p(2, true, 150), 5), Verdict::Hold);
        g.join("cache", 5, 3);
        assert_eq!(g.report("cache", p(1, true, 1), 5), Verdict::Go);
        assert_eq!(g.verdict("db", 5), Verdict::Go);
        assert_eq!(g.verdict("web", 6), Verdict::Go);
        assert_eq!(g.go_spread_ms(), Some(1));
        g.done("cache", 7);
        g.done("web", 7);
        g.done("db", 8);
        assert_eq!(g.members["db"].state, MemberState::Done);
        // A failure after everyone was let go breaks nothing.
        g.fail("web", "late");
        assert!(g.broken.is_none());
    }

    #[test]
    fn a_members_figures_cannot_overflow_the_sums() {
        let mut g = Group::new("app", GroupFailure::Abort, 0);
        g.join("m", u64::MAX, 2);
        g.paced("m"); // pages * 4096 overflowed
        assert_eq!(g.report("m", p(1, true, 0), 1), Verdict::Hold);
        for wire in [u64::MAX, 0, u64::MAX] {
            g.report("m", p(2, true, wire), 2); // the held bytes' sum overflowed
        }
        assert_eq!(g.members["m"].held_bytes, u64::MAX);
        for _ in 0..4 {
            g.paced("m");
        }
        assert_eq!(g.members["m"].paced_saved_bytes, u64::MAX);
    }

    #[test]
    fn a_failed_member_releases_the_others_by_policy() {
        for (policy, want) in [
            (GroupFailure::Abort, Verdict::Abort),
            (GroupFailure::Continue, Verdict::Alone),
        ] {
            let mut g = Group::new("app", policy, 0);
            g.join("a", 1, 2);
            g.join("b", 1, 2);
            assert_eq!(g.report("a", p(1, true, 1), 1), Verdict::Hold);
            g.fail("b", "aborted by operator");
            assert_eq!(g.verdict("a", 2), want);
            assert_eq!(g.report("a", p(2, true, 2), 3), want);
            assert!(g.broken.as_deref().unwrap().contains("aborted by operator"));
        }
        assert_eq!(
            Group::new("x", GroupFailure::Abort, 0).report("stranger", p(1, true, 1), 1),
            Verdict::Abort
        );
    }

    #[test]
    fn pacing_is_costed_at_the_average_held_iteration() {
        let mut g = Group::new("app", GroupFailure::Abort, 0);
        g.join("a", 1000, 0);
        g.join("b", 1000, 0);
        g.report("a", p(1, true, 100), 1);
        g.report("a", p(2, true, 300), 2); // held: 200 bytes
        g.report("a", p(3, true, 400), 3); // held: 100 bytes
        g.paced("a");
        g.paced("a");
        assert_eq!(g.members["a"].paced_waits, 2);
        assert_eq!(g.members["a"].paced_saved_bytes, 300);
        assert_eq!(
            "continue".parse::<GroupFailure>(),
            Ok(GroupFailure::Continue)
        );
        assert!("maybe".parse::<GroupFailure>().is_err());
    }
}
