//! Snapshots of a sled store: one file, zstd-compressed, checksummed.
//!
//! Layout: `MAGIC`, then one zstd frame per tree (its entries as
//! `[u32 key len][key][u32 value len][value]`, big-endian), then the JSON
//! manifest, its length as a big-endian u32, and the SHA-256 of every byte
//! before it. The manifest holds each section's SHA-256 (of the
//! uncompressed entries), so `verify` checks the whole file and every
//! section. A snapshot is written to a temp file, fsynced, then renamed, so
//! a crash mid-write leaves no file that verifies.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"OPSNAP\x00\x01";
pub const FORMAT_VERSION: u32 = 1;
/// Files `list` and retention consider; temp files never end in it.
pub const EXTENSION: &str = "snap";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a valid snapshot: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("store: {0}")]
    Store(#[from] super::StoreError),
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("{0}")]
    Refused(String),
}

/// What a snapshot holds, written at its end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    /// "agent" or "aggregator".
    pub store: String,
    pub node_id: Option<String>,
    pub outpost_version: String,
    pub created_unix_ms: i64,
    /// The agent's last seq (None for an aggregator store).
    pub last_seq: Option<u64>,
    pub head_height: Option<u64>,
    pub sections: Vec<Section>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub tree: String,
    pub entries: u64,
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub sha256: String,
}

/// Who the snapshot is of; the caller reads these from its store.
pub struct Meta {
    pub store: String,
    pub node_id: Option<String>,
    pub last_seq: Option<u64>,
    pub head_height: Option<u64>,
}

/// A written snapshot.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub manifest: Manifest,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Counts and hashes what passes through to `inner`.
struct Hashing<W> {
    inner: W,
    hash: Context,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Work done, reported as it goes: bytes read (verify, restore) or entries
/// written (create). Drives the command line's progress bar.
pub type Progress<'a> = &'a dyn Fn(u64);

/// Writes a snapshot of every tree in `db` into `dir` and returns it.
pub fn create(db: &sled::Db, meta: Meta, dir: &Path) -> Result<Written, SnapshotError> {
    create_with(db, meta, dir, &|_| {})
}

/// `create`, reporting each entry written to `progress`.
pub fn create_with(
    db: &sled::Db,
    meta: Meta,
    dir: &Path,
    progress: Progress,
) -> Result<Written, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let created_unix_ms = crate::model::now_unix_ms();
    let name = format!(
        "outpost-{}-{}-{created_unix_ms}.{EXTENSION}",
        meta.store,
        meta.node_id.as_deref().unwrap_or("fleet")
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = write_file(db, meta, created_unix_ms, &tmp, progress).and_then(
        |(bytes, sha256, manifest)| {
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
            Ok(Written {
                path: path.clone(),
                bytes,
                sha256,
                manifest,
            })
        },
    );
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_file(
    db: &sled::Db,
    meta: Meta,
    created_unix_ms: i64,
    tmp: &Path,
    progress: Progress,
) -> Result<(u64, String, Manifest), SnapshotError> {
    let file = File::create(tmp).map_err(io(tmp))?;
    let mut out = Hashing {
        inner: BufWriter::new(file),
        hash: Context::new(&SHA256),
        bytes: 0,
    };
    out.write_all(MAGIC).map_err(io(tmp))?;
    let mut sections = Vec::new();
    let mut names: Vec<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
    names.sort();
    for name in names {
        let tree = db.open_tree(&name)?;
        let start = out.bytes;
        let mut section_hash = Context::new(&SHA256);
        let (mut entries, mut raw_bytes) = (0u64, 0u64);
        let mut z = zstd::Encoder::new(&mut out, 3).map_err(io(tmp))?;
        for kv in tree.iter() {
            let (k, v) = kv?;
            for part in [&k[..], &v[..]] {
                let len = (part.len() as u32).to_be_bytes();
                z.write_all(&len).map_err(io(tmp))?;
                z.write_all(part).map_err(io(tmp))?;
                section_hash.update(&len);
                section_hash.update(part);
                raw_bytes += 4 + part.len() as u64;
            }
            entries += 1;
            progress(1);
        }
        z.finish().map_err(io(tmp))?;
        sections.push(Section {
            tree: String::from_utf8_lossy(&name).into_owned(),
            entries,
            raw_bytes,
            compressed_bytes: out.bytes - start,
            sha256: hex(section_hash.finish().as_ref()),
        });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        store: meta.store,
        node_id: meta.node_id,
        outpost_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms,
        last_seq: meta.last_seq,
        head_height: meta.head_height,
        sections,
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| io(tmp)(std::io::Error::other(e)))?;
    out.write_all(&json).map_err(io(tmp))?;
    out.write_all(&(json.len() as u32).to_be_bytes())
        .map_err(io(tmp))?;
    let digest = out.hash.clone().finish();
    let mut file = out
        .inner
        .into_inner()
        .map_err(|e| io(tmp)(e.into_error()))?;
    file.write_all(digest.as_ref()).map_err(io(tmp))?;
    file.sync_all().map_err(io(tmp))?;
    Ok((out.bytes + 32, hex(digest.as_ref()), manifest))
}

/// Reads the manifest after checking the whole-file checksum.
fn read_checked(
    path: &Path,
    progress: Progress,
) -> Result<(File, Manifest, String), SnapshotError> {
    let mut f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len < (MAGIC.len() + 4 + 32) as u64 {
        return Err(invalid(path, format!("only {len} bytes")));
    }
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).map_err(io(path))?;
    if &magic != MAGIC {
        return Err(invalid(path, "no Outpost snapshot header"));
    }
    f.seek(SeekFrom::Start(0)).map_err(io(path))?;
    let mut hash = Context::new(&SHA256);
    let mut left = len - 32;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n]).map_err(io(path))?;
        hash.update(&buf[..n]);
        left -= n as u64;
        progress(n as u64);
    }
    let mut want = [0u8; 32];
    f.read_exact(&mut want).map_err(io(path))?;
    let got = hash.finish();
    if got.as_ref() != want {
        return Err(invalid(
            path,
            "whole-file checksum mismatch (truncated or altered)",
        ));
    }
    f.seek(SeekFrom::Start(len - 32 - 4)).map_err(io(path))?;
    let mut mlen = [0u8; 4];
    f.read_exact(&mut mlen).map_err(io(path))?;
    let mlen = u32::from_be_bytes(mlen) as u64;
    let mstart = (len - 36)
        .checked_sub(mlen)
        .filter(|s| *s >= MAGIC.len() as u64)
        .ok_or_else(|| invalid(path, "manifest length out of range"))?;
    f.seek(SeekFrom::Start(mstart)).map_err(io(path))?;
    let mut json = vec![0u8; mlen as usize];
    f.read_exact(&mut json).map_err(io(path))?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| invalid(path, format!("manifest: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(invalid(
            path,
            format!(
                "format version {} (this outpost reads {FORMAT_VERSION})",
                manifest.format_version
            ),
        ));
    }
    let sections: u64 = manifest.sections.iter().map(|s| s.compressed_bytes).sum();
    if MAGIC.len() as u64 + sections != mstart {
        return Err(invalid(path, "section sizes do not add up to the file"));
    }
    Ok((f, manifest, hex(got.as_ref())))
}

/// Decodes each section in turn, checking its entry count and checksum, and
/// hands every entry to `each(tree, key, value)`.
fn read_sections(
    path: &Path,
    f: File,
    manifest: &Manifest,
    progress: Progress,
    mut each: impl FnMut(&str, Vec<u8>, Vec<u8>) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let mut f = f;
    let mut offset = MAGIC.len() as u64;
    for s in &manifest.sections {
        f.seek(SeekFrom::Start(offset)).map_err(io(path))?;
        offset += s.compressed_bytes;
        let frame = (&mut f).take(s.compressed_bytes);
        let mut z = zstd::Decoder::new(frame).map_err(io(path))?;
        let mut hash = Context::new(&SHA256);
        let bad = |what: &str| invalid(path, format!("section {:?}: {what}", s.tree));
        let read_part =
            |z: &mut zstd::Decoder<_>, hash: &mut Context| -> Result<Vec<u8>, SnapshotError> {
                let mut len = [0u8; 4];
                z.read_exact(&mut len).map_err(|_| bad("truncated entry"))?;
                let n = u32::from_be_bytes(len) as u64;
                if n > s.raw_bytes {
                    return Err(bad("entry longer than its section"));
                }
                let mut part = vec![0u8; n as usize];
                z.read_exact(&mut part)
                    .map_err(|_| bad("truncated entry"))?;
                hash.update(&len);
                hash.update(&part);
                Ok(part)
            };
        for _ in 0..s.entries {
            let k = read_part(&mut z, &mut hash)?;
            let v = read_part(&mut z, &mut hash)?;
            each(&s.tree, k, v)?;
        }
        let mut rest = [0u8; 1];
        if z.read(&mut rest).map_err(|_| bad("undecodable data"))? != 0 {
            return Err(bad("more entries than the manifest says"));
        }
        if hex(hash.finish().as_ref()) != s.sha256 {
            return Err(bad("checksum mismatch"));
        }
        progress(s.compressed_bytes);
    }
    Ok(())
}

/// Re-reads the whole file and checks every checksum.
pub fn verify(path: &Path) -> Result<(Manifest, String), SnapshotError> {
    verify_with(path, &|_| {})
}

/// `verify`, reporting bytes read to `progress`: the file is read twice,
/// once for the whole-file checksum and once section by section.
pub fn verify_with(path: &Path, progress: Progress) -> Result<(Manifest, String), SnapshotError> {
    let (f, manifest, sha) = read_checked(path, progress)?;
    read_sections(path, f, &manifest, progress, |_, _, _| Ok(()))?;
    Ok((manifest, sha))
}

/// A listed snapshot: its manifest, or why the file does not verify.
pub type Listed = (PathBuf, Result<Manifest, String>);

/// Snapshots in `dir`, newest first, each with its manifest if its whole-file
/// checksum holds, or the reason it does not.
pub fn list(dir: &Path) -> Result<Vec<Listed>, SnapshotError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
            continue;
        }
        let m = read_checked(&path, &|_| {})
            .map(|(_, m, _)| m)
            .map_err(|e| e.to_string());
        out.push((path, m));
    }
    out.sort_by_key(|(p, m)| {
        std::cmp::Reverse((
            m.as_ref().map(|m| m.created_unix_ms).unwrap_or(0),
            p.clone(),
        ))
    });
    Ok(out)
}

/// Retention: of the valid snapshots in `dir` of this store (`store` kind and
/// `node_id`), keeps the newest `keep` and any younger than `max_age`, and
/// deletes the rest. Files that do not verify are left for an operator to
/// look at. Returns the deleted files.
pub fn prune(
    dir: &Path,
    store: &str,
    node_id: Option<&str>,
    keep: usize,
    max_age: Option<std::time::Duration>,
    now_unix_ms: i64,
) -> Result<Vec<PathBuf>, SnapshotError> {
    let mut deleted = Vec::new();
    let ours = list(dir)?.into_iter().filter_map(|(p, m)| {
        m.ok()
            .filter(|m| m.store == store && m.node_id.as_deref() == node_id)
            .map(|m| (p, m))
    });
    for (i, (path, m)) in ours.enumerate() {
        let age_ms = now_unix_ms.saturating_sub(m.created_unix_ms);
        let young = max_age.is_some_and(|a| (age_ms as u128) < a.as_millis());
        if i < keep || young {
            continue;
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
        deleted.push(path);
    }
    Ok(deleted)
}

/// `prune` off the async threads, logging each deletion and any failure.
pub async fn prune_logged(
    dir: PathBuf,
    store: &'static str,
    node_id: Option<String>,
    keep: usize,
    max_age: Option<std::time::Duration>,
) {
    let pruned = tokio::task::spawn_blocking(move || {
        prune(
            &dir,
            store,
            node_id.as_deref(),
            keep,
            max_age,
            crate::model::now_unix_ms(),
        )
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    match pruned {
        Ok(deleted) => {
            for d in deleted {
                tracing::info!(file = %d.display(), "snapshot deleted by retention");
            }
        }
        Err(e) => tracing::warn!("snapshot retention failed: {e}"),
    }
}

/// Deletes, and logs, temp files a crash mid-write left in `dir` (they
/// never verify).
pub fn remove_partial(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".outpost-")
            && name.ends_with(".tmp")
            && std::fs::remove_file(&path).is_ok()
        {
            tracing::warn!(file = %path.display(), "removed a partial snapshot left by a crash");
        }
    }
}

/// The newest snapshot of an agent that verifies in full, if any, and why
/// each newer one was passed over.
pub type Newest = (Option<(PathBuf, Manifest)>, Vec<String>);

/// The newest snapshot in `dir` of this agent that verifies in full.
pub fn newest_valid(dir: &Path, node_id: &str) -> Result<Newest, SnapshotError> {
    let mut skipped = Vec::new();
    if !dir.exists() {
        return Ok((None, skipped));
    }
    for (path, m) in list(dir)? {
        match m {
            Ok(m) if m.store == "agent" && m.node_id.as_deref() == Some(node_id) => {
                match verify(&path) {
                    Ok((m, _)) => return Ok((Some((path, m)), skipped)),
                    Err(e) => skipped.push(e.to_string()),
                }
            }
            Ok(_) => {}
            Err(e) => skipped.push(format!("{}: {e}", path.display())),
        }
    }
    Ok((None, skipped))
}

/// Restores `path` into `data_dir`. Refuses a store that is open in another
/// process, or one whose last seq is newer than the snapshot's, unless
/// `force`. An existing store is moved aside, never deleted; returns where.
pub fn restore(
    path: &Path,
    data_dir: &Path,
    force: bool,
) -> Result<(Manifest, Option<PathBuf>), SnapshotError> {
    restore_with(path, data_dir, force, &|_| {})
}

/// `restore`, reporting bytes read to `progress` (the file is read twice).
pub fn restore_with(
    path: &Path,
    data_dir: &Path,
    force: bool,
    progress: Progress,
) -> Result<(Manifest, Option<PathBuf>), SnapshotError> {
    // The whole-file checksum first; sections are checked as they are imported
    // into a staging store, which is discarded if one fails.
    let (file, manifest, _) = read_checked(path, progress)?;
    let existing = data_dir.exists()
        && std::fs::read_dir(data_dir)
            .map_err(io(data_dir))?
            .next()
            .is_some();
    if existing {
        let db = match super::open_db(data_dir, 1 << 20) {
            Ok(db) => Some(db),
            Err(e) if e.is_in_use() => {
                return Err(SnapshotError::Refused(format!(
                    "{}: the store is in use by a running process; stop it first",
                    data_dir.display()
                )));
            }
            // A store that will not open is what a restore is for.
            Err(_) => None,
        };
        if let (Some(db), Some(snap_seq)) = (db, manifest.last_seq) {
            let current = super::local::last_seq_of(&db)?;
            if current > snap_seq && !force {
                return Err(SnapshotError::Refused(format!(
                    "{}: the store is newer (last seq {current}) than the snapshot (last seq {snap_seq}); use --force to replace it",
                    data_dir.display()
                )));
            }
        }
    }
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".outpost-restore-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    {
        let db = super::open_db(staging.path(), 16 << 20)?;
        read_sections(path, file, &manifest, progress, |tree, k, v| {
            db.open_tree(tree)?.insert(k, v)?;
            Ok(())
        })?;
        if manifest.store == "agent" {
            let witness = super::local::LocalStore::witness(data_dir);
            super::local::settle_restored_marker(
                &db.open_tree("agent")?,
                manifest.last_seq.unwrap_or(0),
                witness,
            )?;
        }
        db.flush()?;
    }
    let aside = if existing {
        let aside = data_dir.with_file_name(format!(
            "{}.before-restore-{}",
            data_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("store"),
            crate::model::now_unix_ms()
        ));
        std::fs::rename(data_dir, &aside).map_err(io(data_dir))?;
        Some(aside)
    } else {
        let _ = std::fs::remove_dir(data_dir);
        None
    };
    let staged = staging.keep();
    std::fs::rename(&staged, data_dir).map_err(io(data_dir))?;
    Ok((manifest, aside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hash, Header};
    use crate::proto::event::Kind;
    use crate::store::local::{Commit, LocalStore};
    use crate::store::Durability;

    fn store_with_headers(dir: &Path, heights: std::ops::RangeInclusive<u64>) -> LocalStore {
        let s = LocalStore::open(dir, 1 << 20, Durability::ProcessCrash, 1 << 30).unwrap();
        add_headers(&s, heights);
        s
    }

    fn add_headers(s: &LocalStore, heights: std::ops::RangeInclusive<u64>) {
        for h in heights {
            let header = Header {
                height: h,
                hash: Hash(vec![h as u8; 32]),
                parent_hash: Hash(vec![h.wrapping_sub(1) as u8; 32]),
                timestamp: h as i64,
                raw: None,
            };
            let commit = Commit {
                events: vec![Kind::Header(header.to_proto())],
                headers: vec![header],
                ..Default::default()
            };
            s.commit(commit, 0).unwrap();
        }
    }

    fn meta(s: &LocalStore) -> Meta {
        Meta {
            store: "agent".into(),
            node_id: Some("node-1".into()),
            last_seq: Some(s.last_seq()),
            head_height: s.head().unwrap().map(|h| h.height),
        }
    }

    fn entries(db: &sled::Db) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let mut names: Vec<_> = db.tree_names();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            for kv in db.open_tree(&n).unwrap().iter() {
                let (k, v) = kv.unwrap();
                out.push((n.to_vec(), k.to_vec(), v.to_vec()));
            }
        }
        out
    }

    #[test]
    fn restore_gives_back_exactly_the_snapshotted_store() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let s = store_with_headers(&live, 1..=500);
        let w = create(s.db(), meta(&s), &dir.path().join("snaps")).unwrap();
        assert_eq!(w.manifest.last_seq, Some(500));
        assert_eq!(w.manifest.head_height, Some(500));
        assert_eq!(w.bytes, std::fs::metadata(&w.path).unwrap().len());
        let (m, sha) = verify(&w.path).unwrap();
        assert_eq!((m, sha), (w.manifest.clone(), w.sha256.clone()));

        let at_snapshot = entries(s.db());
        // Written after the snapshot: not in the restored store.
        add_headers(&s, 501..=510);
        let target = dir.path().join("restored");
        let (m, aside) = restore(&w.path, &target, false).unwrap();
        assert_eq!(aside, None);
        let restored =
            LocalStore::open(&target, 1 << 20, Durability::ProcessCrash, 1 << 30).unwrap();
        assert_eq!(restored.last_seq(), m.last_seq.unwrap());
        assert_eq!(restored.head().unwrap().unwrap().height, 500);
        assert_eq!(entries(restored.db()), at_snapshot);
    }

    /// A snapshot taken before the agent first reached the aggregator holds
    /// the unconfirmed-after marker. Its events were sent later; a restore
    /// from it must not take them for events the aggregator lacks.
    #[tokio::test]
    async fn a_snapshot_from_before_the_first_reconcile_restores_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let w = {
            let s = store_with_headers(&live, 1..=5);
            let w = create(s.db(), meta(&s), &dir.path().join("snaps")).unwrap();
            // Connected: 1..=5 sent and stored, then 6..=7.
            s.reconcile(0, 0).await.unwrap();
            add_headers(&s, 6..=7);
            s.flush().await.unwrap();
            s.ack(0, 7).await.unwrap();
            s.write_witness().unwrap();
            s.flush().await.unwrap();
            w
        };
        // The store is lost; the snapshot replaces it.
        restore(&w.path, &live, true).unwrap();
        let s = LocalStore::open(&live, 1 << 20, Durability::ProcessCrash, 1 << 30).unwrap();
        assert_eq!(s.last_seq(), 5);
        // The aggregator holds 1..=7: the restored 1..=5 are among them.
        assert_eq!(s.reconcile(0, 7).await.unwrap(), 0, "nothing renumbered");
        assert!(s.records_after(0, 100).unwrap().is_empty());
    }

    #[test]
    fn a_truncated_or_altered_snapshot_fails_verify_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_with_headers(&dir.path().join("live"), 1..=50);
        let w = create(s.db(), meta(&s), &dir.path().join("snaps")).unwrap();
        let bytes = std::fs::read(&w.path).unwrap();

        let cut = dir.path().join("cut.snap");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let flipped = dir.path().join("flipped.snap");
        let mut b = bytes.clone();
        b[20] ^= 0x01;
        std::fs::write(&flipped, &b).unwrap();
        for bad in [&cut, &flipped] {
            let e = verify(bad).unwrap_err().to_string();
            assert!(e.contains("not a valid snapshot"), "{e}");
            let target = dir.path().join("target");
            assert!(restore(bad, &target, true).is_err());
            assert!(
                !target.exists(),
                "a refused restore created {}",
                target.display()
            );
        }
        // `list` shows both, each marked invalid.
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|(_, m)| m.is_err()));
    }

    #[test]
    fn restore_refuses_a_newer_store_unless_forced_and_moves_it_aside() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let w = {
            let s = store_with_headers(&live, 1..=10);
            let w = create(s.db(), meta(&s), &dir.path().join("snaps")).unwrap();
            add_headers(&s, 11..=20);
            s.db().flush().unwrap();
            w
        };
        let e = restore(&w.path, &live, false).unwrap_err().to_string();
        assert!(e.contains("newer (last seq 20)"), "{e}");
        let (_, aside) = restore(&w.path, &live, true).unwrap();
        let aside = aside.expect("the old store is kept");
        let old = LocalStore::open(&aside, 1 << 20, Durability::ProcessCrash, 1 << 30).unwrap();
        assert_eq!(old.last_seq(), 20);
        let new = LocalStore::open(&live, 1 << 20, Durability::ProcessCrash, 1 << 30).unwrap();
        assert_eq!(new.last_seq(), 10);
    }

    #[test]
    fn restore_refuses_a_store_that_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let s = store_with_headers(&live, 1..=3);
        let w = create(s.db(), meta(&s), &dir.path().join("snaps")).unwrap();
        let e = restore(&w.path, &live, true).unwrap_err().to_string();
        assert!(e.contains("in use by a running process"), "{e}");
        assert_eq!(s.last_seq(), 3);
    }
}
