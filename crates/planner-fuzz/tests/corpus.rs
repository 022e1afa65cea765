//! Replays the checked-in fuzz corpus on stable: every file under `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through its target's body, so a past crash fails
//! `cargo test` without nightly or cargo-fuzz (see `docs/fuzzing.md`).

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a corpus entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, body) = planner_fuzz::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no corpus for {target} under {}",
        fuzz_dir().display()
    );
    for path in files {
        let data = std::fs::read(&path).expect("a readable corpus file");
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(
            outcome.is_ok(),
            "{target} panicked on {}; reproduce with `cargo test -p planner-fuzz` or \
             `cargo +nightly fuzz run {target} {}` in fuzz/",
            path.display(),
            path.display()
        );
    }
}

/// Every target has a test (and a fuzz_target wrapper, checked by name).
#[test]
fn every_target_has_a_corpus_and_a_wrapper() {
    for (target, _) in planner_fuzz::TARGETS {
        assert!(!inputs(target).is_empty(), "no corpus for {target}");
        let wrapper = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        assert!(wrapper.is_file(), "no {}", wrapper.display());
    }
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*
    };
}

replay_tests!(
    rule_parser,
    plan_validation,
    event_decoding,
    snapshot_decoding,
    wire_command,
    wire_report,
    wire_lease,
    file_store_reader,
);
