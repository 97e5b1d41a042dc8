//! sled storage shared by both modes: opening, durable flushing and key
//! encoding. `local` is the agent's store, `central` the aggregator's.

pub mod central;
pub mod local;
pub mod snapshot;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store at {path}: fsync failed: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store holds an unreadable record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl StoreError {
    /// True when the store could not open because another process holds it
    /// (sled locks its files while a `Db` is open).
    pub fn is_in_use(&self) -> bool {
        matches!(self, StoreError::Open { source, .. }
            if source.to_string().contains("could not acquire lock"))
    }

    /// True for a write that failed on the disk (full, I/O error). sled
    /// 0.34 keeps such an error and returns it for every later write of the
    /// open store, even once the disk has room again: only reopening
    /// (restarting the process) recovers.
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Io(_)))
    }
}

/// Bytes free to unprivileged writers on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// `free_bytes` of one directory's filesystem, read at most once per
/// `every`: it is asked on every batch, and the disk does not fill up
/// between two batches a millisecond apart.
pub struct FreeSpace {
    dir: PathBuf,
    every_ms: u64,
    epoch: std::time::Instant,
    /// When it was last read, in ms since `epoch`, plus one (0: never).
    read_at: std::sync::atomic::AtomicU64,
    /// What it read; `u64::MAX` when the read failed.
    free: std::sync::atomic::AtomicU64,
}

impl FreeSpace {
    pub fn new(dir: &Path, every: std::time::Duration) -> FreeSpace {
        FreeSpace {
            dir: dir.to_path_buf(),
            every_ms: every.as_millis() as u64,
            epoch: std::time::Instant::now(),
            read_at: Default::default(),
            free: Default::default(),
        }
    }

    /// Bytes free, as of at most `every` ago; None when it cannot be read.
    pub fn get(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let at = self.read_at.load(Relaxed);
        if at == 0 || now.saturating_sub(at) >= self.every_ms {
            let free = free_bytes(&self.dir).unwrap_or(u64::MAX);
            self.free.store(free, Relaxed);
            self.read_at.store(now, Relaxed);
        }
        Some(self.free.load(Relaxed)).filter(|f| *f != u64::MAX)
    }
}

/// What a flush promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Flushed data survives a crash or `kill -9` of the process (it is in the
    /// kernel's page cache); a power loss can take up to sled's 500 ms fsync
    /// interval with it.
    #[default]
    ProcessCrash,
    /// Every flush also fsyncs the store's files before events count as durable.
    PowerLoss,
}

///
/// A store this process has just closed can hold its file lock for a
/// moment longer, while sled's background threads finish with it (a
/// restore closes the store it wrote, and start-up opens it at once): a
/// lock that is busy is tried again for up to a second before the store
/// counts as in use by another process.
pub fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
    let started = std::time::Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.to_path_buf(),
                source,
            });
        match opened {
            Err(e) if e.is_in_use() && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Makes everything written so far durable to the promised degree.
pub async fn flush(db: &sled::Db, dir: &Path, durability: Durability) -> Result<(), StoreError> {
    db.flush_async().await?;
    if durability == Durability::PowerLoss {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || fsync_dir_files(&dir))
            .await
            .map_err(|e| StoreError::Sync {
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })??;
    }
    Ok(())
}

fn fsync_dir_files(dir: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Sync {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|source| StoreError::Sync {
                    path: path.clone(),
                    source,
                })?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

/// `prefix` followed by `n` big-endian, so keys sort numerically.
pub fn key_u64(prefix: &[u8], n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The number at the end of a key made by `key_u64`.
pub fn key_tail_u64(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub fn decode<M: prost::Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

pub fn u64_value(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_keys_sort_in_order() {
        let a = key_u64(b"h", 9);
        let b = key_u64(b"h", 10);
        let c = key_u64(b"h", 256);
        assert!(a < b && b < c);
        assert_eq!(key_tail_u64(&c), Some(256));
        assert_eq!(key_tail_u64(b"abc"), None);
    }

    #[test]
    fn free_space_is_read_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let cached = FreeSpace::new(&path, std::time::Duration::from_secs(3600));
        let fresh = FreeSpace::new(&path, std::time::Duration::ZERO);
        assert!(cached.get().is_some());
        assert!(fresh.get().is_some());
        drop(dir);
        // The directory is gone: a read fails, a cached value stands.
        assert!(cached.get().is_some(), "read again within the interval");
        assert_eq!(fresh.get(), None, "read each time");
    }
}
