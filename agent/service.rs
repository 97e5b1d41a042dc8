//! Living under systemd: readiness, the watchdog, and signals.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

/// Tells systemd the service is ready (a no-op outside systemd).
pub fn notify_ready() {
    notify(&[("READY", "1")]);
}

pub fn notify_stopping() {
    notify(&[("STOPPING", "1")]);
}

pub fn notify_watchdog() {
    notify(&[("WATCHDOG", "1")]);
}

pub fn notify_status(status: &str) {
    notify(&[("STATUS", status)]);
}

fn notify(state: &[(&str, &str)]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = systemd::daemon::notify(state.iter()) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// How often to ping the watchdog, if systemd asked for one: half its timeout.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("WATCHDOG_USEC")?;
    match systemd::daemon::watchdog_enabled() {
        Ok(usec) if usec > 0 => Some(Duration::from_micros(usec / 2)),
        _ => None,
    }
}

/// Resolves on SIGTERM or SIGINT, naming which. SIGHUP (`systemctl reload`)
/// must not end the service: until live reload exists it is logged and
/// otherwise ignored.
pub async fn shutdown_signal() -> &'static str {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        std::future::pending::<()>().await;
        unreachable!()
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => tracing::warn!(
                "SIGHUP received: live config reload is not supported yet; restart the service to apply config changes"
            ),
        }
    }
}
