//! Replays the committed corpora through every target, in every `cargo test`: a decoder change
//! that makes a seed (a real message) fail to decode, or that panics on anything the fuzzer
//! once found interesting, fails here without the fuzzer.

use std::path::{Path, PathBuf};

use fleetcast_fuzz::{targets, Verdict};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files
}

fn is_seed(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
}

#[test]
fn every_committed_corpus_file_replays_and_every_seed_is_accepted() {
    for target in targets::ALL {
        let files = files(&corpus_dir(target.name));
        assert!(
            files.iter().any(|f| is_seed(f)),
            "{} has no seeds: cargo run -p fleetcast-fuzz --bin seed-corpus",
            target.name
        );
        for file in files {
            let data = std::fs::read(&file).expect("corpus file reads");
            let verdict = (target.run)(&data);
            if is_seed(&file) {
                assert_eq!(
                    verdict,
                    Verdict::Accepted,
                    "{} no longer decodes; if the format changed on purpose, rerun \
                     cargo run -p fleetcast-fuzz --bin seed-corpus",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_seeds_the_code_makes_now_are_accepted() {
    for target in targets::ALL {
        for (i, seed) in (target.seeds)().iter().enumerate() {
            assert_eq!(
                (target.run)(seed),
                Verdict::Accepted,
                "{} seed {i}",
                target.name
            );
        }
    }
}

#[test]
fn every_corpus_directory_belongs_to_a_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for dir in files(&root) {
        let name = dir
            .file_name()
            .expect("named")
            .to_string_lossy()
            .into_owned();
        assert!(
            fleetcast_fuzz::find(&name).is_some(),
            "corpus/{name} has no target in fuzz/src/targets/mod.rs"
        );
    }
}

#[test]
fn targets_reject_what_is_not_a_message() {
    for target in targets::ALL {
        for junk in [&b""[..], b"\xff"] {
            assert_eq!(
                (target.run)(junk),
                Verdict::Rejected,
                "{} accepted {junk:?}",
                target.name
            );
        }
    }
}
