//! `skyferryd`'s command line. It lives in the library (not the binary) so that
//! `skyferry gen-docs` can build the daemon's man page and completions from the same
//! definition the daemon parses.

use std::path::PathBuf;

/// The daemon's arguments.
#[derive(clap::Parser, Debug)]
#[command(
    name = "skyferryd",
    version,
    about = "skyferry daemon: sends and receives live migrations",
    long_about = "skyferry daemon: sends and receives live migrations.\n\n\
        One runs on each host, driven by the `skyferry` CLI through its control socket. \
        Under systemd (Type=notify) it reports READY once its control socket and listener \
        are up, a STATUS line with the migrations running, and WATCHDOG pings while its \
        loops answer. SIGTERM or SIGINT stop it: it logs the signal, removes its control \
        socket and exits 0."
)]
pub struct DaemonArgs {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/skyferry/skyferryd.toml")]
    pub config: PathBuf,
    /// Check the configuration and the key file, say what is wrong or that they are valid,
    /// then exit (0 when valid).
    #[arg(long)]
    pub check_config: bool,
}
