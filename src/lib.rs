//! QuantumGate kernel: the protocol core (`proto`, always built) and the tokio
//! I/O shell (`shell`, behind the default `shell` feature).
#![deny(unsafe_code)]

// Test hooks reach into the node and its sealed state; a release build (the
// one `scripts/install` and the demo make) must never carry them. Fuzzing
// builds are optimised and set `--cfg fuzzing`.
#[cfg(all(feature = "test-hooks", not(debug_assertions), not(fuzzing)))]
compile_error!("the `test-hooks` feature is for tests and fuzzing, never a release build");

pub mod proto;

#[doc(hidden)]
#[cfg(feature = "test-hooks")]
pub mod fuzzing;

#[cfg(feature = "shell")]
pub mod shell;
