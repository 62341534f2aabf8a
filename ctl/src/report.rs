//! `skyferry report ID --svg FILE`: a migration's timeline from the daemon's status.

use std::path::{Path, PathBuf};

use crate::daemon_cmds::statuses;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Migration id (hex), as `skyferry status` shows it.
    #[arg(value_parser = dataplane::migrate::migration_id::parse)]
    id: u64,
    /// Where to write the timeline (SVG).
    #[arg(long, value_name = "FILE")]
    svg: PathBuf,
}

/// Draws the migration's timeline into the file.
pub fn run(socket: &Path, a: &ReportArgs) -> Result<(), String> {
    let list = statuses(socket, Some(a.id))?;
    let s = list
        .first()
        .ok_or_else(|| format!("no migration {:x} on this host", a.id))?;
    crate::timeline::write_svg(s, &a.svg)?;
    println!("timeline: {}", a.svg.display());
    Ok(())
}
