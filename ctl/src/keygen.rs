//! `skyferry keygen`: write a fresh pre-shared key, readable by its owner only.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use dataplane::crypto::PreSharedKey;

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the key (64 hex digits). Created with mode 0600; a missing directory
    /// is created with mode 0700.
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing key file (migrations using the old key will fail to connect).
    #[arg(long)]
    force: bool,
}

pub fn run(args: &Args) -> Result<(), String> {
    let key = PreSharedKey::generate().map_err(|e| e.to_string())?;
    let path = &args.out;
    if args.force {
        // Remove first, so the new file is created 0600 rather than keeping old modes.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot replace {}: {e}", path.display())),
        }
    }
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                format!(
                    "cannot create the directory {}: {e} (create it as root: \
                     `install -d -m 0700 {}`, or choose another --out)",
                    dir.display(),
                    dir.display()
                )
            })?;
        println!("created the directory {} (mode 0700)", dir.display());
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => format!(
                "{} already exists; pass --force to replace it (peers must then get the new key)",
                path.display()
            ),
            _ => format!("cannot create {}: {e}", path.display()),
        })?;
    file.write_all(key.to_hex().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!(
        "wrote a new pre-shared key to {} (mode 0600)",
        path.display()
    );
    Ok(())
}
