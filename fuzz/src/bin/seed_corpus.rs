//! Writes each target's seeds (real messages made by the code, with the fixed test keys) to
//! `fuzz/corpus/<target>/seed-<n>`, replacing the old seeds and leaving every other corpus
//! file alone. Run after a message format change: `cargo run -p fleetcast-fuzz --bin seed-corpus`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for target in fleetcast_fuzz::targets::ALL {
        let dir = corpus.join(target.name);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with("seed-") {
                std::fs::remove_file(entry.path())?;
            }
        }
        let seeds = (target.seeds)();
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed)?;
        }
        println!("{:<16} {} seeds", target.name, seeds.len());
    }
    Ok(())
}
