#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qdfs::fuzzing::fuzz_capability(data));
