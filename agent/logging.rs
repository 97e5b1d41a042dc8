//! Logging: to journald with native fields (NODE_ID, CHAIN, ACTOR, ...) when
//! running under systemd, to stderr otherwise.
//!
//! `OUTPOST_LOG_TARGET=journald|stderr` overrides the choice; `RUST_LOG`
//! overrides the configured level.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the global subscriber. Returns where logs go.
pub fn init(level: &str) -> &'static str {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let want_journal = match std::env::var("OUTPOST_LOG_TARGET").as_deref() {
        Ok("journald") => true,
        Ok("stderr") => false,
        _ => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("outpost".into());
                if tracing_subscriber::registry()
                    .with(layer.with_filter(filter))
                    .try_init()
                    .is_ok()
                {
                    return "journald";
                }
                return "unchanged";
            }
            Err(e) => {
                eprintln!("outpost: journald is not reachable ({e}); logging to stderr");
            }
        }
    }
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .try_init()
        .is_ok()
    {
        "stderr"
    } else {
        "unchanged"
    }
}
