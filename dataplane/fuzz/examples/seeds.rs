//! Writes the seed inputs of the `open_decode` target into a corpus directory:
//!
//! ```sh
//! cargo run --example seeds -- corpus/open_decode
//! ```

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "corpus/open_decode".into()),
    );
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in skyferry_dataplane_fuzz::seeds() {
        let path = dir.join(name);
        std::fs::write(&path, &bytes)?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
