//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! functions the fuzz targets call, so inputs that once mattered keep being
//! checked by a plain `cargo test`, with or without cargo-fuzz.

use std::path::Path;

/// A fuzz target: its name and the function it calls.
type Target = (&'static str, fn(&[u8]));

#[test]
fn every_target_survives_its_corpus() {
    let targets: [Target; 7] = [
        ("manifest", qdfs::fuzzing::fuzz_manifest),
        ("wire", qdfs::fuzzing::fuzz_wire),
        ("provider_record", qdfs::fuzzing::fuzz_provider_record),
        ("resume", qdfs::fuzzing::fuzz_resume),
        ("http", qdfs::fuzzing::fuzz_http),
        ("capability", qdfs::fuzzing::fuzz_capability),
        ("private_records", qdfs::fuzzing::fuzz_private_records),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, run) in targets {
        let dir = root.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            run(&data);
            // Every prefix too: truncation is the commonest damage.
            for cut in 0..data.len() {
                run(&data[..cut]);
            }
            n += 1;
        }
        assert!(n > 0, "corpus {} is empty", dir.display());
    }
}
