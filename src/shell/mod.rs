//! The tokio I/O shell: configuration, state directory, control socket and
//! the loops that move packets between the TUN, the UDP socket and the
//! protocol core.

pub mod config;
pub mod control;
pub mod extender;
pub mod filter;
pub mod lan;
pub mod metrics;
pub mod privilege;
pub mod run;
pub mod state;
pub mod status;
pub mod vault;
