//! Writes the seed inputs of the fuzz targets into corpus directories:
//!
//! ```sh
//! cargo run --example seeds                          # every target, into corpus/<target>
//! cargo run --example seeds -- handshake [dir]       # one target
//! cargo run --example seeds -- corpus/open_decode    # open_decode's, into a directory
//! ```

use std::path::PathBuf;

type Seeds = Vec<(String, Vec<u8>)>;

fn seeds(target: &str) -> Option<Seeds> {
    Some(match target {
        "open_decode" => skyferry_dataplane_fuzz::seeds(),
        "handshake" => skyferry_dataplane_fuzz::handshake::seeds()
            .into_iter()
            .map(|(name, bytes, _)| (name, bytes))
            .collect(),
        "control" => skyferry_dataplane_fuzz::control::seeds(),
        _ => return None,
    })
}

fn write(dir: PathBuf, seeds: Seeds) -> std::io::Result<()> {
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in seeds {
        let path = dir.join(name);
        std::fs::write(&path, &bytes)?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    match args.first().map(|a| a.to_string_lossy().into_owned()) {
        None => {
            for target in ["open_decode", "handshake", "control"] {
                let dir = PathBuf::from("corpus").join(target);
                write(dir, seeds(target).expect("a target"))?;
            }
            Ok(())
        }
        Some(first) => match seeds(&first) {
            Some(seeds) => {
                let dir = args
                    .get(1)
                    .map_or_else(|| PathBuf::from("corpus").join(&first), PathBuf::from);
                write(dir, seeds)
            }
            // Not a target's name: a directory for open_decode's seeds (the old usage).
            None => write(
                PathBuf::from(&args[0]),
                seeds("open_decode").expect("a target"),
            ),
        },
    }
}
