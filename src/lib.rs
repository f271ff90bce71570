//! QuantumGate kernel: the protocol core (`proto`, always built) and the tokio
//! I/O shell (`shell`, behind the default `shell` feature).
#![deny(unsafe_code)]

pub mod proto;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(feature = "shell")]
pub mod shell;
