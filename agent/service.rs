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

pub fn notify(state: &[(&str, &str)]) {
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

/// What a signal asks of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT, by name.
    Stop(&'static str),
    /// SIGHUP: `systemctl reload`.
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP, installed once and read in a loop.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Resolves on SIGTERM or SIGINT, naming which, for a mode with nothing to
/// reload: SIGHUP is logged and otherwise ignored.
pub async fn shutdown_signal() -> &'static str {
    let Ok(mut signals) = Signals::install() else {
        std::future::pending::<()>().await;
        unreachable!()
    };
    loop {
        match signals.next().await {
            Signal::Stop(name) => return name,
            Signal::Reload => tracing::warn!("SIGHUP received: this mode has no config to reload"),
        }
    }
}
