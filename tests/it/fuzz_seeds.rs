//! Every fuzz target's seeds, replayed through the same code the target
//! runs (`outpost::fuzz`). The long runs that search beyond the seeds are
//! `bash fuzz/run.sh SECONDS` (RELIABILITY.md has their figures).

use std::path::Path;

#[test]
fn every_fuzz_target_takes_its_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| e.unwrap().file_name().to_string_lossy().replace(".rs", ""))
        .collect();
    files.sort();
    let names: Vec<&str> = outpost::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        files, names,
        "fuzz/fuzz_targets and outpost::fuzz::TARGETS list the same targets"
    );
    for (name, run) in outpost::fuzz::TARGETS {
        let dir = root.join("seeds").join(name);
        let seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            !seeds.is_empty(),
            "{name} has no seeds in {}",
            dir.display()
        );
        for seed in seeds {
            let bytes = std::fs::read(&seed).unwrap();
            run(&bytes);
            // And each seed cut short, as a truncated read would leave it.
            run(&bytes[..bytes.len() / 2]);
        }
    }
}
