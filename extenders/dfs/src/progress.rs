//! Progress of a fetch: an indicatif bar on a terminal, plain lines or
//! JSON lines otherwise.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// One progress sample of a file being fetched.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Bytes verified on disk (including what earlier runs left).
    pub done: u64,
    /// File size.
    pub total: u64,
    /// Bytes received from the network in this run.
    pub received: u64,
    /// Providers currently sending.
    pub providers: usize,
}

/// Where progress goes.
pub trait Progress: Send + Sync {
    /// A file starts (`already` bytes verified by earlier runs).
    fn begin(&self, name: &str, total: u64, already: u64);
    /// A sample, about ten a second.
    fn update(&self, s: Sample);
    /// Something worth telling (a provider failed or was dropped).
    fn note(&self, msg: &str);
    /// The file is done (or stopped).
    fn end(&self);
}

/// No output at all.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64, _: u64) {}
    fn update(&self, _: Sample) {}
    fn note(&self, _: &str) {}
    fn end(&self) {}
}

/// An indicatif bar on stderr: bytes, rate, providers, ETA.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    /// A bar (shown once a file begins).
    pub fn new() -> Bar {
        Bar {
            bar: Mutex::new(None),
        }
    }
}

impl Default for Bar {
    fn default() -> Self {
        Bar::new()
    }
}

impl Progress for Bar {
    fn begin(&self, name: &str, total: u64, already: u64) {
        let b = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        b.set_style(style);
        b.set_prefix(name.to_string());
        b.set_position(already);
        b.reset_eta();
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }
    fn update(&self, s: Sample) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.set_position(s.done);
            b.set_message(format!("{} providers", s.providers));
        }
    }
    fn note(&self, msg: &str) {
        match &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }
    fn end(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish();
        }
    }
}

/// A plain line on stderr about once a second.
pub struct Lines {
    state: Mutex<(Instant, Instant, String)>,
}

impl Lines {
    /// Lines to stderr.
    pub fn new() -> Lines {
        let now = Instant::now();
        Lines {
            state: Mutex::new((now, now, String::new())),
        }
    }
}

impl Default for Lines {
    fn default() -> Self {
        Lines::new()
    }
}

impl Progress for Lines {
    fn begin(&self, name: &str, total: u64, already: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = (Instant::now(), Instant::now(), name.to_string());
        eprintln!("{name}: {total} bytes, {already} already verified on disk");
    }
    fn update(&self, s: Sample) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1.elapsed() < Duration::from_secs(1) {
            return;
        }
        st.1 = Instant::now();
        let secs = st.0.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "{}: {}/{} bytes, {:.1} MB/s, {} providers",
            st.2,
            s.done,
            s.total,
            s.received as f64 / secs / 1e6,
            s.providers
        );
    }
    fn note(&self, msg: &str) {
        eprintln!("{msg}");
    }
    fn end(&self) {}
}

/// JSON lines on stdout about once a second:
/// `{"event":"progress","name":..,"done":..,"total":..,"received":..,"providers":..}`.
pub struct JsonLines {
    state: Mutex<(Instant, String)>,
}

impl JsonLines {
    /// JSON lines to stdout.
    pub fn new() -> JsonLines {
        JsonLines {
            state: Mutex::new((Instant::now(), String::new())),
        }
    }
    fn emit(v: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
}

impl Default for JsonLines {
    fn default() -> Self {
        JsonLines::new()
    }
}

impl Progress for JsonLines {
    fn begin(&self, name: &str, total: u64, already: u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), name.into());
        JsonLines::emit(
            json!({"event": "begin", "name": name, "total": total, "already": already}),
        );
    }
    fn update(&self, s: Sample) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0.elapsed() < Duration::from_secs(1) {
            return;
        }
        st.0 = Instant::now();
        JsonLines::emit(json!({
            "event": "progress", "name": st.1, "done": s.done, "total": s.total,
            "received": s.received, "providers": s.providers,
        }));
    }
    fn note(&self, msg: &str) {
        JsonLines::emit(json!({"event": "note", "message": msg}));
    }
    fn end(&self) {}
}
