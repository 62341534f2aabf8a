//! What can go wrong steering DRBD, each error naming the step it broke.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::resource::InvalidDisk;
use super::steer::{DiskPhase, RollBackReport};

/// The steps of the disk sequence, as the migration driver calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Asynchronous replication until the disks are equal.
    BulkSync,
    /// Synchronous replication before the memory migration.
    BeforeMemory,
    /// Two primaries, the destination promoted.
    Switchover,
    /// The source demoted, after the guest committed at the destination.
    AfterCommit,
    /// Back to one primary and asynchronous replication.
    Finish,
    /// Undoing what a failed migration changed.
    RollBack,
}

impl Step {
    /// The name used in messages and status: `bulk-sync`, `before-memory`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Step::BulkSync => "bulk-sync",
            Step::BeforeMemory => "before-memory",
            Step::Switchover => "switchover",
            Step::AfterCommit => "after-commit",
            Step::Finish => "finish",
            Step::RollBack => "roll-back",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Steering DRBD failed. Every variant that comes from a step names it, and a failed
/// command carries its command line, its exit status and what drbdadm printed, since that
/// is where DRBD says why.
#[derive(Debug, thiserror::Error)]
pub enum DrbdError {
    /// the disk's configuration is unusable
    #[error(transparent)]
    Invalid(#[from] InvalidDisk),
    /// the resource file could not be written
    #[error("cannot write DRBD resource file {path}: {source}")]
    WriteConfig {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// this host cannot do what the steering needs (read its name, start a thread)
    #[error("DRBD steering: {context}: {source}")]
    Host {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// drbdadm or drbdsetup could not be started
    #[error("disk step {step}: cannot run `{command}`: {source} (is drbd-utils installed?)")]
    Spawn {
        /// The step.
        step: Step,
        /// The command line.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// a command exited with an error
    #[error("disk step {step}: `{command}` failed with {status}: {}", quoted_output(.stderr, .stdout))]
    Command {
        /// The step.
        step: Step,
        /// The command line.
        command: String,
        /// Exit status, or the signal that ended it.
        status: String,
        /// What it printed on stderr.
        stderr: String,
        /// What it printed on stdout.
        stdout: String,
    },
    /// a command did not finish in time and was killed
    #[error("disk step {step}: `{command}` did not finish within {after:?} and was killed: {}", quoted_output(.stderr, ""))]
    Timeout {
        /// The step.
        step: Step,
        /// The command line.
        command: String,
        /// The limit.
        after: Duration,
        /// What it printed on stderr before it was killed.
        stderr: String,
    },
    /// drbdsetup's output could not be read
    #[error("disk step {step}: cannot read the output of `{command}`: {reason}")]
    Unreadable {
        /// The step.
        step: Step,
        /// The command line.
        command: String,
        /// What is wrong with it.
        reason: String,
    },
    /// DRBD is not in the state the step needs
    #[error("disk step {step}: resource {resource}, {after}: {problems}; DRBD reports: {state}")]
    Unexpected {
        /// The step.
        step: Step,
        /// The resource.
        resource: String,
        /// What the step had just done (or was about to do).
        after: String,
        /// What differs from what the step needs.
        problems: String,
        /// DRBD's state, in one line.
        state: String,
    },
    /// the disks did not get in sync in time
    #[error(
        "disk step {step}: resource {resource} was not in sync after {after:?} ({problems}); last state: {state}"
    )]
    SyncDeadline {
        /// The step.
        step: Step,
        /// The resource.
        resource: String,
        /// The deadline.
        after: Duration,
        /// What was not yet in sync.
        problems: String,
        /// DRBD's state, in one line.
        state: String,
    },
    /// the migration was aborted while the step waited
    #[error("disk step {step}: resource {resource}: aborted")]
    Aborted {
        /// The step.
        step: Step,
        /// The resource.
        resource: String,
    },
    /// a step was called out of order (a bug in the caller)
    #[error("disk step {step} called with resource {resource} in phase {phase}; it needs {needs}")]
    OutOfOrder {
        /// The step.
        step: Step,
        /// The resource.
        resource: String,
        /// The phase it was called in.
        phase: DiskPhase,
        /// The phases it may be called in.
        needs: String,
    },
    /// the roll back could not restore everything
    #[error("disk step roll-back incomplete: {report}")]
    RollBackIncomplete {
        /// What was done and what failed.
        report: RollBackReport,
    },
}

impl DrbdError {
    /// The step the error belongs to, if it came from one.
    pub fn step(&self) -> Option<Step> {
        match self {
            DrbdError::Invalid(_) | DrbdError::WriteConfig { .. } | DrbdError::Host { .. } => None,
            DrbdError::Spawn { step, .. }
            | DrbdError::Command { step, .. }
            | DrbdError::Timeout { step, .. }
            | DrbdError::Unreadable { step, .. }
            | DrbdError::Unexpected { step, .. }
            | DrbdError::SyncDeadline { step, .. }
            | DrbdError::Aborted { step, .. }
            | DrbdError::OutOfOrder { step, .. } => Some(*step),
            DrbdError::RollBackIncomplete { .. } => Some(Step::RollBack),
        }
    }
}

/// A command's output for a one-line message: stderr, or stdout when stderr is empty
/// (drbdadm's dry run and some drbdsetup errors print there), trimmed and shortened.
fn quoted_output(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let text = text.trim();
    if text.is_empty() {
        return "(no output)".into();
    }
    // Keep the end: DRBD's reason comes last.
    const MAX: usize = 1500;
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| text.len() - i <= MAX)
        .unwrap_or(0);
    let short = if cut > 0 {
        format!("...{}", &text[cut..])
    } else {
        text.to_string()
    };
    short.replace('\n', " | ")
}
