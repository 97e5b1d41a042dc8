//! The agent's store writer: what the rules decided goes into the store
//! as one atomic commit (headers, findings and status with their events),
//! then a flush makes it durable, and now and then the witness file is
//! rewritten. A write that fails on the disk leaves sled's store
//! unwritable until it is reopened, so the agent exits for systemd to
//! restart it.

use std::time::{Duration, Instant};

use crate::model::now_unix_ms;
use crate::store::local::{Commit, LocalStore};
use crate::store::StoreError;

/// How often the store's witness file is rewritten while events flow.
const WITNESS_EVERY: Duration = Duration::from_secs(5);

pub struct StoreWriter {
    store: LocalStore,
    retain_headers: u64,
    /// When the store's witness file was last written.
    witness_at: Option<Instant>,
    /// Told when the store can no longer be written (the process exits).
    fatal: Option<tokio::sync::watch::Sender<Option<String>>>,
}

impl StoreWriter {
    pub fn new(store: LocalStore, retain_headers: u64) -> StoreWriter {
        StoreWriter {
            store,
            retain_headers,
            witness_at: None,
            fatal: None,
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// How many headers to keep below the head (`store.retain_headers`).
    pub fn retain(&mut self, headers: u64) {
        self.retain_headers = headers;
    }

    /// A write that fails on the disk is told on `fatal`, and the process
    /// exits; without it, only the actor restarts.
    pub fn exit_on_disk_failure(&mut self, fatal: tokio::sync::watch::Sender<Option<String>>) {
        self.fatal = Some(fatal);
    }

    /// Commits `commit`; the flush is the returned future, to run off the
    /// actor's thread.
    pub(super) fn commit(
        &self,
        commit: Commit,
    ) -> Result<impl std::future::Future<Output = Result<(), StoreError>>, (&'static str, StoreError)>
    {
        let head = commit.headers.last().map(|h| h.height);
        match self.store.commit(commit, now_unix_ms()) {
            Ok(done) if done.dropped > 0 => {
                tracing::warn!(dropped = done.dropped, "outbox full: telemetry dropped")
            }
            Ok(_) => {}
            Err(e) => return Err(("commit", e)),
        }
        if let Some(h) = head {
            if let Err(e) = self.store.prune_headers(h, self.retain_headers) {
                tracing::warn!("header retention failed: {e}");
            }
        }
        let store = self.store.clone();
        Ok(async move { store.flush().await })
    }

    pub(super) fn flushed(&mut self) {
        if self.witness_at.is_none_or(|t| t.elapsed() >= WITNESS_EVERY) {
            self.witness_at = Some(Instant::now());
            if let Err(e) = self.store.write_witness() {
                tracing::warn!("store witness not written: {e}");
            }
        }
    }

    /// Whether a failure ends the process (true) or only the actor.
    pub(super) fn failed(&self, what: &str, e: &StoreError) -> bool {
        match (&self.fatal, e.is_io()) {
            (Some(fatal), true) => {
                let msg = format!("store {what} failed on the disk: {e}; exiting so that a restart reopens the store");
                tracing::error!("{msg}");
                fatal.send_replace(Some(msg));
                true
            }
            _ => {
                tracing::error!("store {what} failed: {e}; validate restarts");
                false
            }
        }
    }
}
