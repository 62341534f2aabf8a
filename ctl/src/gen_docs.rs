//! `skyferry gen-docs DIR` (hidden): man pages (clap_mangen) and shell completions
//! (clap_complete: bash, zsh, fish) of `skyferry`, each of its subcommands, and `skyferryd`,
//! generated from the clap definitions the programs parse, so they cannot drift from them.
//! The Debian package is built from its output (see packaging/build-deb).

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory: man pages go to DIR/man/, completions to DIR/completions/.
    dir: PathBuf,
}

pub fn run(args: &Args) -> Result<(), String> {
    let man = args.dir.join("man");
    let completions = args.dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let mut written = 0;
    for cmd in [
        crate::Cli::command(),
        dataplane::daemon::cli::DaemonArgs::command(),
    ] {
        written += man_pages(&cmd, &man)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut cmd = cmd.clone();
            let name = cmd.get_name().to_string();
            clap_complete::generate_to(shell, &mut cmd, &name, &completions)
                .map_err(|e| format!("completions for {shell}: {e}"))?;
            written += 1;
        }
    }
    println!("wrote {written} files under {}", args.dir.display());
    Ok(())
}

/// `cmd`'s page, and one per visible subcommand (`skyferry-start.1`, ...).
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<usize, String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let write = |cmd: clap::Command, name: &str| -> Result<(), String> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .map_err(|e| e.to_string())?;
        std::fs::write(&path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    let name = cmd.get_name().to_string();
    let mut n = 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let sub_name = format!("{name}-{}", sub.get_name());
        // The page's title and synopsis: `skyferry-start`, `skyferry start ...`.
        let page = sub
            .clone()
            .display_name(sub_name.clone())
            .bin_name(format!("{name} {}", sub.get_name()));
        write(page, &sub_name)?;
        n += 1;
    }
    write(cmd, &name)?;
    Ok(n)
}
