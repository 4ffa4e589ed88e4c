//! Logging as runc does it: `--log FILE` (default stderr) and
//! `--log-format text|json`. containerd's runc shim reads the last error
//! from that file as JSON lines with `level` and `msg`, so the JSON format
//! is runc's (logrus): `{"level":"error","msg":"...","time":"..."}`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// logrus's text format: `time="..." level=error msg="..."`.
    Text,
    /// One JSON object per line.
    Json,
}

enum Sink {
    Stderr,
    File(Mutex<File>),
}

struct RuncLayer {
    sink: Sink,
    format: LogFormat,
    max: Level,
}

#[derive(Default)]
struct Message {
    msg: String,
    fields: Vec<(String, String)>,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_owned();
        } else {
            self.fields
                .push((field.name().to_owned(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.msg = format!("{value:?}");
        } else {
            self.fields
                .push((field.name().to_owned(), format!("{value:?}")));
        }
    }
}

/// Now as RFC 3339 in UTC with nanoseconds.
pub fn rfc3339_now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `t` as RFC 3339 in UTC with nanoseconds (`2026-11-25T18:00:00.123456789Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

impl<S: Subscriber> Layer<S> for RuncLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = event.metadata().level();
        if *level > self.max {
            return;
        }
        let mut m = Message::default();
        event.record(&mut m);
        let line = match self.format {
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("level".into(), level_name(level).into());
                obj.insert("msg".into(), m.msg.into());
                obj.insert("time".into(), rfc3339_now().into());
                for (k, v) in m.fields {
                    obj.insert(k, v.into());
                }
                serde_json::Value::Object(obj).to_string()
            }
            LogFormat::Text => {
                let mut s = format!(
                    "time=\"{}\" level={} msg={:?}",
                    rfc3339_now(),
                    level_name(level),
                    m.msg
                );
                for (k, v) in m.fields {
                    s.push_str(&format!(" {k}={v:?}"));
                }
                s
            }
        };
        match &self.sink {
            Sink::Stderr => {
                let _ = writeln!(std::io::stderr(), "{line}");
            }
            Sink::File(f) => {
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// Installs the logger. Without `--log` only warnings and errors go to
/// stderr (and errors are printed there by the binary anyway).
pub fn init(
    log: Option<&Path>,
    format: LogFormat,
    debug: bool,
    level: Option<rtv_runtime::config::LogLevel>,
) -> std::io::Result<()> {
    use rtv_runtime::config::LogLevel;
    // The file's level: --debug, else the configuration's `log.level`,
    // else info.
    let file_level = match (debug, level) {
        (true, _) => Level::DEBUG,
        (false, None | Some(LogLevel::Info)) => Level::INFO,
        (false, Some(LogLevel::Error)) => Level::ERROR,
        (false, Some(LogLevel::Warn)) => Level::WARN,
        (false, Some(LogLevel::Debug)) => Level::DEBUG,
        (false, Some(LogLevel::Trace)) => Level::TRACE,
    };
    let (sink, max) = match log {
        Some(p) => (
            Sink::File(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            file_level,
        ),
        None => (Sink::Stderr, if debug { Level::DEBUG } else { Level::WARN }),
    };
    let subscriber = tracing_subscriber::registry().with(RuncLayer { sink, format, max });
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_764_094_200, 5);
        assert_eq!(rfc3339(t), "2025-11-25T18:10:00.000000005Z");
        assert_eq!(
            rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
    }
}
