//! The tokio I/O shell.
