//! The agent's log: lines on its stderr (the guest console), filtered by a
//! level from the kernel command line (`rtv.log=error|warn|info|debug`).

use std::sync::atomic::{AtomicU8, Ordering};

/// Log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);

/// Sets the level from a name; unknown names leave it unchanged.
pub fn set_level(name: &str) {
    let level = match name {
        "error" => Level::Error,
        "warn" => Level::Warn,
        "info" => Level::Info,
        "debug" | "trace" => Level::Debug,
        _ => return,
    };
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Whether messages at `level` are shown.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Logs a formatted message at a level.
#[macro_export]
macro_rules! alog {
    ($level:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$level) {
            eprintln!("rtv-agent: {}: {}", stringify!($level).to_lowercase(), format_args!($($arg)*));
        }
    };
}
