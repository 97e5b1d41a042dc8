//! The aggregator's store: per node its record (last seq, head, status),
//! headers by height, findings and the event log, in one sled tree so that
//! each received batch lands in one atomic write.
//!
//! Batches from many streams are applied together: sled writes and syncs a
//! log buffer on every `apply_batch`, so one apply per persist would cost
//! one disk write per report. A writer thread gathers whatever batches are
//! queued, applies them as one atomic batch (at most every `APPLY_EVERY`)
//! and answers each.
//!
//! Keys: `n`+node → NodeRecord, `h`+node+0+(height / 64) → HeaderChunk,
//! `f`+node+0+id → Finding, `e`+node+0+first seq → Batch (the event log).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::local::event_last_seq;
use super::{decode, key_tail_u64, Durability, StoreError};
use crate::proto::{self, event::Kind, HeaderChunk, NodeRecord};

/// The writer applies at most one batch this often. Each apply writes a sled
/// log buffer through sled's thread pool, which wakes every idle IO thread
/// for each write; with many agents reporting, fewer and larger applies
/// save about a quarter of the aggregator's CPU for at most this much
/// latency (BENCHMARKS.md, fleet load).
const APPLY_EVERY: std::time::Duration = std::time::Duration::from_millis(2);

/// The writer's batches stop growing past this many bytes of keys and values.
const APPLY_MAX_BYTES: usize = 8 << 20;

/// Heights per header chunk.
const CHUNK: u64 = 64;

#[derive(Clone)]
pub struct CentralStore {
    db: sled::Db,
    tree: sled::Tree,
    commit: Arc<GroupCommit>,
    writer: mpsc::UnboundedSender<Pending>,
    /// Event batches are persisted under a shared hold of it; a snapshot
    /// holds it alone, so no batch is half in a snapshot (sled's iterators
    /// are not a point-in-time view).
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Read at most every 100 ms: every batch asks.
    free: Arc<super::FreeSpace>,
}

/// Many streams share one flush: each caller waits for the first flush that
/// starts after its write.
struct GroupCommit {
    requested: AtomicU64,
    wake: Notify,
    done: watch::Sender<Result<u64, String>>,
}

/// A stream whose agent holds less than the aggregator does (its Hello's
/// last seq is below the stored one: its store was restored from a
/// snapshot or lost its tail). It reads the node's blocks after its own head
/// again and reports its own head on the way up. Until it is back at the
/// height the index held at its Hello, a status below that height on the
/// indexed chain is the agent catching up, not the node going back; a
/// second status at the same height is the node, and so is any header that
/// differs from the index.
#[derive(Debug, Clone, PartialEq)]
pub struct CatchUp {
    below: u64,
    last_status: Option<u64>,
}

impl CatchUp {
    /// The catch-up of a stream whose agent said `agent_last_seq` in its
    /// Hello, for the node's stored record; None if it holds all it sent.
    pub fn after_hello(rec: &NodeRecord, agent_last_seq: u64) -> Option<CatchUp> {
        (agent_last_seq < rec.last_seq && rec.indexed_top > 0).then_some(CatchUp {
            below: rec.indexed_top,
            last_status: None,
        })
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Persisted {
    pub last_seq: u64,
    pub stored: usize,
    pub duplicates: usize,
    /// The events that were new, in seq order, for the fleet: less the
    /// statuses of an agent catching up (see `CatchUp`).
    pub events: Vec<proto::Event>,
    /// Seq ranges `(first, last)` that were skipped without a gap event
    /// covering them: events lost on the way.
    pub missing: Vec<(u64, u64)>,
}

fn node_key(prefix: u8, node: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + node.len() + 8);
    k.push(prefix);
    k.extend_from_slice(node.as_bytes());
    k.push(0);
    k
}

fn node_key_u64(prefix: u8, node: &str, n: u64) -> Vec<u8> {
    let mut k = node_key(prefix, node);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn record_key(node: &str) -> Vec<u8> {
    [b"n".as_slice(), node.as_bytes()].concat()
}

impl CentralStore {
    /// Opens the store and starts its group-commit task (needs a tokio runtime).
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        durability: Durability,
    ) -> Result<CentralStore, StoreError> {
        let db = super::open_db(dir, cache_bytes)?;
        let tree = db.open_tree("aggregator")?;
        let (done, _) = watch::channel(Ok(0));
        let commit = Arc::new(GroupCommit {
            requested: AtomicU64::new(0),
            wake: Notify::new(),
            done,
        });
        tokio::spawn(run_group_commit(
            commit.clone(),
            db.clone(),
            dir.to_path_buf(),
            durability,
        ));
        let (writer, queued) = mpsc::unbounded_channel();
        let applying = tree.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(applying, queued, APPLY_MAX_BYTES))
            .map_err(|source| StoreError::Sync {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(CentralStore {
            db,
            tree,
            commit,
            writer,
            gate: Arc::default(),
            free: Arc::new(super::FreeSpace::new(
                dir,
                std::time::Duration::from_millis(100),
            )),
        })
    }

    /// Readiness: the store answers a read, and its filesystem has more
    /// room than `min_free` (below it, events are refused).
    pub fn check(&self, min_free: u64) -> crate::health::Check {
        use crate::health::Check;
        if let Err(e) = self.tree.first() {
            return Check::failed("store", format!("a read failed: {e}"));
        }
        match self.free_bytes() {
            Some(free) if free < min_free => Check::failed(
                "store",
                format!("{free} bytes free, under store.min_free_bytes ({min_free}): events are refused"),
            ),
            Some(free) => Check::ok("store", format!("open, {} MiB free", free >> 20)),
            None => Check::ok("store", "open"),
        }
    }

    /// Bytes free on the store's filesystem, as of at most 100 ms ago.
    pub fn free_bytes(&self) -> Option<u64> {
        self.free.get()
    }

    /// Hold this while persisting a batch of events.
    pub async fn persisting(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Writes a snapshot of the store into `dir`; batches wait until it is
    /// done. Blocks: call it from `spawn_blocking`.
    pub fn snapshot(
        &self,
        dir: &Path,
    ) -> Result<super::snapshot::Written, super::snapshot::SnapshotError> {
        let _only = self.gate.blocking_write();
        let meta = super::snapshot::Meta {
            store: "aggregator".into(),
            node_id: None,
            last_seq: None,
            head_height: None,
        };
        super::snapshot::create(&self.db, meta, dir)
    }

    /// Waits until everything written before this call is durable.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let mine = self.commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.commit.done.subscribe();
        self.commit.wake.notify_one();
        loop {
            match &*rx.borrow_and_update() {
                Ok(done) if *done >= mine => return Ok(()),
                Err(e) => {
                    return Err(StoreError::Sync {
                        path: PathBuf::new(),
                        source: std::io::Error::other(e.clone()),
                    })
                }
                Ok(_) => {}
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Sync {
                    path: PathBuf::new(),
                    source: std::io::Error::other("group commit stopped"),
                });
            }
        }
    }

    pub fn node(&self, node: &str) -> Result<Option<NodeRecord>, StoreError> {
        let key = record_key(node);
        match self.tree.get(&key)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.tree
            .scan_prefix(b"n")
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Records who the agent says it is (the node id comes from its certificate).
    pub fn register(
        &self,
        node: &str,
        hello: &proto::Hello,
        now_ms: i64,
    ) -> Result<NodeRecord, StoreError> {
        let mut rec = self.node(node)?.unwrap_or_else(|| NodeRecord {
            node_id: node.to_string(),
            ..Default::default()
        });
        rec.network = hello.network.clone();
        rec.chain = hello.chain.clone();
        rec.agent_version = hello.agent_version.clone();
        rec.last_seen_unix_ms = now_ms;
        self.tree.insert(record_key(node), rec.encode_to_vec())?;
        Ok(rec)
    }

    /// Stores the events above the node's last seq in one atomic write and
    /// ignores the rest as duplicates. Calls for one node must not overlap
    /// (each reads the record the previous one wrote); await `durable`
    /// before acknowledging.
    pub async fn persist(
        &self,
        node: &str,
        events: Vec<proto::Event>,
        now_ms: i64,
        catch_up: &mut Option<CatchUp>,
    ) -> Result<Persisted, StoreError> {
        let (writes, persisted) = self.prepare(node, events, now_ms, catch_up)?;
        let (done, applied) = oneshot::channel();
        let stopped = || StoreError::Sync {
            path: PathBuf::new(),
            source: std::io::Error::other("store writer stopped"),
        };
        self.writer
            .send(Pending { writes, done })
            .map_err(|_| stopped())?;
        applied.await.map_err(|_| stopped())??;
        Ok(persisted)
    }

    /// The writes that persist a batch, and what it will have persisted.
    fn prepare(
        &self,
        node: &str,
        events: Vec<proto::Event>,
        now_ms: i64,
        catch_up: &mut Option<CatchUp>,
    ) -> Result<(Writes, Persisted), StoreError> {
        let mut rec = self.node(node)?.unwrap_or_else(|| NodeRecord {
            node_id: node.to_string(),
            ..Default::default()
        });
        let mut batch = Writes::default();
        let mut headers = ChunkEdits::new(self, node);
        let mut kept = Vec::with_capacity(events.len());
        let mut duplicates = 0;
        let mut missing = Vec::new();
        // Per kept event: whether the fleet gets it (resent markers and a
        // catching-up agent's statuses are logged only).
        let mut for_fleet = Vec::with_capacity(events.len());
        for e in events {
            let last = event_last_seq(&e);
            if last <= rec.last_seq {
                duplicates += 1;
                continue;
            }
            // `last > rec.last_seq`, so the next seq exists.
            let expected = rec.last_seq + 1;
            if e.seq > expected {
                tracing::warn!(
                    target: "outpost::audit",
                    node_id = node,
                    expected,
                    got = e.seq,
                    "seq gap not covered by a gap event"
                );
                missing.push((expected, e.seq - 1));
                rec.missing_events = rec.missing_events.saturating_add(e.seq - expected);
            }
            // A resent header is logged as a marker in its place.
            let mut resent = None;
            let mut fleet_gets_it = true;
            match &e.kind {
                Some(Kind::Header(h)) => {
                    let again = h.height <= rec.indexed_top && headers.holds(h.height, &h.hash)?;
                    match catch_up {
                        Some(c) if again && h.height < c.below => {}
                        _ => *catch_up = None,
                    }
                    if again {
                        // Read again after a restore: the index and the log
                        // have it; the log keeps the seq with a marker.
                        rec.redelivered_headers += 1;
                        fleet_gets_it = false;
                        resent = Some(proto::Event {
                            seq: e.seq,
                            at_unix_ms: e.at_unix_ms,
                            kind: Some(Kind::Resent(proto::Resent {
                                height: h.height,
                                hash: h.hash.clone(),
                            })),
                        });
                    } else {
                        headers.upsert(h.clone())?;
                        rec.indexed_top = rec.indexed_top.max(h.height);
                        rec.head = Some(h.clone());
                    }
                }
                Some(Kind::Status(s))
                    if s.head_height < rec.indexed_top
                        && !s.head_hash.is_empty()
                        && catch_up.as_ref().is_some_and(|c| {
                            s.head_height < c.below && c.last_status != Some(s.head_height)
                        })
                        && headers.holds(s.head_height, &s.head_hash)? =>
                {
                    if let Some(c) = catch_up {
                        c.last_status = Some(s.head_height);
                    }
                    fleet_gets_it = false;
                    rec.status = Some(s.clone());
                }
                Some(Kind::Status(s)) => {
                    // The node's chain got shorter: forget headers above its head.
                    if s.head_height < rec.indexed_top && !s.head_hash.is_empty() {
                        *catch_up = None;
                        headers.truncate_above(s.head_height)?;
                        rec.indexed_top = s.head_height;
                        rec.head = Some(proto::Header {
                            height: s.head_height,
                            hash: s.head_hash.clone(),
                            ..Default::default()
                        });
                    }
                    rec.status = Some(s.clone());
                }
                Some(Kind::Finding(f)) => {
                    let mut k = node_key(b'f', node);
                    k.extend_from_slice(f.id.as_bytes());
                    batch.insert(k, f.encode_to_vec());
                }
                Some(Kind::Gap(g)) => rec.dropped_events += g.dropped,
                Some(Kind::Snapshot(s)) => {
                    rec.last_snapshot = Some(s.clone());
                    rec.last_snapshot_at_unix_ms = e.at_unix_ms;
                }
                // Refused from agents before a batch gets here.
                Some(Kind::Resent(_)) | None => {}
            }
            rec.last_seq = last;
            kept.push(resent.unwrap_or(e));
            for_fleet.push(fleet_gets_it);
        }
        headers.write(&mut batch);
        rec.duplicates_ignored += duplicates as u64;
        rec.last_seen_unix_ms = now_ms;
        let stored = kept.len();
        let log = proto::Batch {
            events: kept,
            pending: 0,
        };
        if let Some(first) = log.events.first().map(|e| e.seq) {
            batch.insert(node_key_u64(b'e', node, first), log.encode_to_vec());
        }
        batch.insert(record_key(node), rec.encode_to_vec());
        let events = log
            .events
            .into_iter()
            .zip(for_fleet)
            .filter_map(|(e, to_fleet)| to_fleet.then_some(e))
            .collect();
        let persisted = Persisted {
            last_seq: rec.last_seq,
            stored,
            duplicates,
            events,
            missing,
        };
        Ok((batch, persisted))
    }

    pub fn headers(
        &self,
        node: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<proto::Header>, StoreError> {
        let mut out = Vec::new();
        let chunks = node_key_u64(b'h', node, from / CHUNK)..=node_key_u64(b'h', node, to / CHUNK);
        for kv in self.tree.range(chunks) {
            let (k, v) = kv?;
            let chunk: HeaderChunk = decode(&k, &v)?;
            out.extend(
                chunk
                    .headers
                    .into_iter()
                    .filter(|h| (from..=to).contains(&h.height)),
            );
        }
        Ok(out)
    }

    fn chunk(&self, node: &str, index: u64) -> Result<Vec<proto::Header>, StoreError> {
        let key = node_key_u64(b'h', node, index);
        match self.tree.get(&key)? {
            Some(v) => Ok(decode::<HeaderChunk>(&key, &v)?.headers),
            None => Ok(Vec::new()),
        }
    }

    /// Writes a finding under a scope: a node id, or `@network` for a
    /// network-wide finding (node ids cannot contain `@`).
    pub fn put_finding(&self, scope: &str, f: &proto::Finding) -> Result<(), StoreError> {
        let mut k = node_key(b'f', scope);
        k.extend_from_slice(f.id.as_bytes());
        self.tree.insert(k, f.encode_to_vec())?;
        Ok(())
    }

    pub fn findings(&self, node: &str) -> Result<Vec<proto::Finding>, StoreError> {
        self.tree
            .scan_prefix(node_key(b'f', node))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Events with seq ≥ `from`, in seq order, at most `limit`.
    pub fn events(
        &self,
        node: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<proto::Event>, StoreError> {
        let start = self
            .tree
            .range(node_key_u64(b'e', node, 0)..=node_key_u64(b'e', node, from))
            .next_back()
            .transpose()?
            .map(|(k, _)| k.to_vec())
            .unwrap_or_else(|| node_key_u64(b'e', node, from));
        let mut out = Vec::new();
        for kv in self.tree.range(start..=node_key_u64(b'e', node, u64::MAX)) {
            let (k, v) = kv?;
            let batch: proto::Batch = decode(&k, &v)?;
            out.extend(
                batch
                    .events
                    .into_iter()
                    .filter(|e| event_last_seq(e) >= from),
            );
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        Ok(out)
    }

    /// Keeps the event log of `node` to about its newest `keep` seqs.
    pub fn prune_events(&self, node: &str, last_seq: u64, keep: u64) -> Result<usize, StoreError> {
        let Some(cutoff) = last_seq.checked_sub(keep) else {
            return Ok(0);
        };
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self
            .tree
            .range(node_key_u64(b'e', node, 0)..node_key_u64(b'e', node, cutoff))
        {
            let (k, _) = kv?;
            if key_tail_u64(&k).is_some() {
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(n)
    }
}

/// Header index changes of one persist, gathered per chunk so each chunk is
/// read and written once.
struct ChunkEdits<'a> {
    store: &'a CentralStore,
    node: &'a str,
    chunks: std::collections::BTreeMap<u64, Vec<proto::Header>>,
}

impl<'a> ChunkEdits<'a> {
    fn new(store: &'a CentralStore, node: &'a str) -> Self {
        ChunkEdits {
            store,
            node,
            chunks: Default::default(),
        }
    }

    fn load(&mut self, index: u64) -> Result<&mut Vec<proto::Header>, StoreError> {
        if let std::collections::btree_map::Entry::Vacant(e) = self.chunks.entry(index) {
            e.insert(self.store.chunk(self.node, index)?);
        }
        Ok(self.chunks.get_mut(&index).expect("loaded above"))
    }

    /// Whether the index holds `hash` at `height`.
    fn holds(&mut self, height: u64, hash: &[u8]) -> Result<bool, StoreError> {
        let chunk = self.load(height / CHUNK)?;
        Ok(chunk
            .binary_search_by_key(&height, |x| x.height)
            .is_ok_and(|i| chunk[i].hash == hash))
    }

    fn upsert(&mut self, h: proto::Header) -> Result<(), StoreError> {
        let chunk = self.load(h.height / CHUNK)?;
        match chunk.binary_search_by_key(&h.height, |x| x.height) {
            Ok(i) => chunk[i] = h,
            Err(i) => chunk.insert(i, h),
        }
        Ok(())
    }

    /// Drops headers above `height`: those of the chunks the store holds
    /// from there up and of the chunks this persist already edits. The work
    /// is what is stored, whatever height a peer claimed before.
    fn truncate_above(&mut self, height: u64) -> Result<(), StoreError> {
        let from = height / CHUNK;
        let stored = node_key_u64(b'h', self.node, from)..=node_key_u64(b'h', self.node, u64::MAX);
        for key in self.store.tree.range(stored).keys() {
            if let Some(index) = key_tail_u64(&key?) {
                self.load(index)?;
            }
        }
        for headers in self.chunks.range_mut(from..).map(|(_, h)| h) {
            headers.retain(|h| h.height <= height);
        }
        Ok(())
    }

    fn write(self, batch: &mut Writes) {
        for (index, headers) in self.chunks {
            let key = node_key_u64(b'h', self.node, index);
            if headers.is_empty() {
                batch.remove(key);
            } else {
                batch.insert(key, HeaderChunk { headers }.encode_to_vec());
            }
        }
    }
}

/// The key writes of one persist.
#[derive(Default)]
struct Writes {
    /// In order; `None` removes the key.
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Bytes of keys and values.
    bytes: usize,
}

impl Writes {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.bytes += key.len() + value.len();
        self.ops.push((key, Some(value)));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.bytes += key.len();
        self.ops.push((key, None));
    }
}

struct Pending {
    writes: Writes,
    done: oneshot::Sender<Result<(), sled::Error>>,
}

/// Applies queued persists as one sled batch, in arrival order, until the
/// store is dropped: at most one batch per `APPLY_EVERY`, and a batch stops
/// growing past `max_bytes` (a reconnect storm of agents with
/// backlogs must not become one batch of gigabytes).
fn run_writer(tree: sled::Tree, mut queued: mpsc::UnboundedReceiver<Pending>, max_bytes: usize) {
    let mut last = std::time::Instant::now();
    let mut carried: Option<Pending> = None;
    loop {
        let Some(first) = carried.take().or_else(|| queued.blocking_recv()) else {
            return;
        };
        let since = last.elapsed();
        if since < APPLY_EVERY {
            std::thread::sleep(APPLY_EVERY - since);
        }
        last = std::time::Instant::now();
        let mut bytes = first.writes.bytes;
        let mut group = vec![first];
        while let Ok(more) = queued.try_recv() {
            if bytes + more.writes.bytes > max_bytes {
                carried = Some(more);
                break;
            }
            bytes += more.writes.bytes;
            group.push(more);
        }
        let mut batch = sled::Batch::default();
        let mut answers = Vec::with_capacity(group.len());
        for p in group {
            for (k, v) in p.writes.ops {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
            }
            answers.push(p.done);
        }
        let result = tree.apply_batch(batch);
        for a in answers {
            let _ = a.send(result.clone());
        }
    }
}

async fn run_group_commit(
    commit: Arc<GroupCommit>,
    db: sled::Db,
    dir: PathBuf,
    durability: Durability,
) {
    loop {
        commit.wake.notified().await;
        let target = commit.requested.load(Ordering::SeqCst);
        let result = super::flush(&db, &dir, durability).await;
        let failed = result.is_err();
        let _previous = commit
            .done
            .send_replace(result.map(|_| target).map_err(|e| e.to_string()));
        if failed {
            tracing::error!(
                "aggregator store flush failed; acknowledgements stop until it succeeds"
            );
        }
        if Arc::strong_count(&commit) == 1 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_event(seq: u64, height: u64) -> proto::Event {
        proto::Event {
            seq,
            at_unix_ms: 0,
            kind: Some(Kind::Header(proto::Header {
                height,
                hash: vec![height as u8; 32],
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn persist_dedups_by_seq_and_serves_headers_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        let p = s
            .persist(
                "n1",
                (1..=3).map(|i| header_event(i, i)).collect(),
                0,
                &mut None,
            )
            .await
            .unwrap();
        assert_eq!((p.last_seq, p.stored, p.duplicates), (3, 3, 0));
        let p = s
            .persist(
                "n1",
                (2..=5).map(|i| header_event(i, i)).collect(),
                0,
                &mut None,
            )
            .await
            .unwrap();
        assert_eq!((p.last_seq, p.stored, p.duplicates), (5, 2, 2));
        let new: Vec<u64> = p.events.iter().map(|e| e.seq).collect();
        assert_eq!(new, vec![4, 5]);
        s.durable().await.unwrap();
        let seqs: Vec<u64> = s
            .events("n1", 1, 100)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.events("n1", 4, 100).unwrap()[0].seq, 4);
        assert_eq!(s.headers("n1", 2, 4).unwrap().len(), 3);
        assert!(s.headers("n2", 0, 10).unwrap().is_empty());
        let rec = s.node("n1").unwrap().unwrap();
        assert_eq!(rec.duplicates_ignored, 2);
        assert_eq!(rec.head.unwrap().height, 5);
        assert_eq!(s.prune_events("n1", 5, 2).unwrap(), 1);
        assert_eq!(s.events("n1", 0, 100).unwrap()[0].seq, 4);
    }

    #[tokio::test]
    async fn header_chunks_span_boundaries_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        s.persist(
            "n1",
            (1..=130).map(|i| header_event(i, i)).collect(),
            0,
            &mut None,
        )
        .await
        .unwrap();
        let got: Vec<u64> = s
            .headers("n1", 60, 70)
            .unwrap()
            .iter()
            .map(|h| h.height)
            .collect();
        assert_eq!(got, (60..=70).collect::<Vec<_>>());
        // A replaced header overwrites in place.
        let mut replaced = header_event(131, 64);
        if let Some(Kind::Header(h)) = &mut replaced.kind {
            h.hash = vec![0xee; 32];
        }
        s.persist("n1", vec![replaced], 0, &mut None).await.unwrap();
        assert_eq!(s.headers("n1", 64, 64).unwrap()[0].hash, vec![0xee; 32]);
        // The node's chain got shorter: headers above its head go.
        let status = proto::Event {
            seq: 132,
            at_unix_ms: 0,
            kind: Some(Kind::Status(proto::NodeStatus {
                head_height: 65,
                head_hash: vec![65; 32],
                ..Default::default()
            })),
        };
        s.persist("n1", vec![status], 0, &mut None).await.unwrap();
        assert_eq!(s.headers("n1", 0, 200).unwrap().len(), 65);
        assert_eq!(s.node("n1").unwrap().unwrap().head.unwrap().height, 65);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_persists_of_many_nodes_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        // 64 nodes persist at once, three rounds each, some rounds large.
        let tasks: Vec<_> = (0..64u64)
            .map(|n| {
                let s = s.clone();
                tokio::spawn(async move {
                    let node = format!("n{n}");
                    let mut seq = 0;
                    for round in 0..3u64 {
                        let count = if n % 8 == 0 { 2000 } else { 5 };
                        let events: Vec<_> = (0..count)
                            .map(|i| {
                                seq += 1;
                                header_event(seq, round * 10_000 + i + 1)
                            })
                            .collect();
                        let p = s.persist(&node, events, 0, &mut None).await.unwrap();
                        assert_eq!(p.last_seq, seq);
                    }
                    seq
                })
            })
            .collect();
        for (n, t) in tasks.into_iter().enumerate() {
            let seq = t.await.unwrap();
            let rec = s.node(&format!("n{n}")).unwrap().unwrap();
            assert_eq!(rec.last_seq, seq, "node n{n}");
            let top = 2 * 10_000 + if n % 8 == 0 { 2000 } else { 5 };
            assert_eq!(rec.head.unwrap().height, top);
            assert_eq!(s.headers(&format!("n{n}"), top, top).unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn not_ready_below_the_free_space_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        let ok = s.check(0);
        assert!(ok.ok && ok.detail.starts_with("open"), "{ok:?}");
        let full = s.check(u64::MAX);
        assert!(!full.ok, "{full:?}");
        assert!(
            full.detail.contains("under store.min_free_bytes"),
            "{full:?}"
        );
    }

    #[test]
    fn writer_splits_a_queue_larger_than_its_cap_and_answers_all() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sled::Config::new()
            .path(dir.path())
            .open()
            .unwrap()
            .open_tree("t")
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for i in 0..5u8 {
            let mut writes = Writes::default();
            writes.insert(vec![i], vec![i; 100]);
            let (done, answer) = oneshot::channel();
            tx.send(Pending { writes, done }).unwrap();
            answers.push(answer);
        }
        drop(tx);
        // A cap of 250 bytes fits two 101-byte writes per batch: three batches.
        let applying = tree.clone();
        std::thread::spawn(move || run_writer(applying, rx, 250))
            .join()
            .unwrap();
        for (i, a) in answers.into_iter().enumerate() {
            assert!(a.blocking_recv().unwrap().is_ok(), "write {i} answered");
            assert_eq!(tree.get([i as u8]).unwrap().unwrap().len(), 100);
        }
    }

    /// The agent's status at `height`, on the chain of `header_event`.
    fn status_on_chain(seq: u64, height: u64) -> proto::Event {
        proto::Event {
            seq,
            at_unix_ms: 0,
            kind: Some(Kind::Status(proto::NodeStatus {
                head_height: height,
                head_hash: vec![height as u8; 32],
                ..Default::default()
            })),
        }
    }

    /// Blocks 1..=10 stored from seqs 1..=10; the agent then comes back
    /// with a store restored at seq 4 (head 4).
    async fn restored_agent() -> (tempfile::TempDir, CentralStore, Option<CatchUp>) {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        s.persist(
            "n1",
            (1..=10).map(|i| header_event(i, i)).collect(),
            0,
            &mut None,
        )
        .await
        .unwrap();
        let catch_up = CatchUp::after_hello(&s.node("n1").unwrap().unwrap(), 4);
        assert!(catch_up.is_some());
        (dir, s, catch_up)
    }

    /// After a restore the agent reads blocks 5..=10 again (renumbered past
    /// the aggregator's seqs) and reports its head on the way up: the log
    /// holds every block once, the head never goes back, and the fleet is
    /// not told of a regression.
    #[tokio::test]
    async fn a_restored_agent_reading_blocks_again_logs_each_once() {
        let (_dir, s, mut catch_up) = restored_agent().await;
        let mut events = vec![status_on_chain(11, 6)];
        events.extend((5..=12).map(|h| header_event(h + 7, h)));
        events.push(status_on_chain(20, 12));
        let p = s.persist("n1", events, 0, &mut catch_up).await.unwrap();
        assert_eq!(p.last_seq, 20);
        assert_eq!(catch_up, None, "caught up at 10");
        let fleet: Vec<u64> = p.events.iter().map(|e| e.seq).collect();
        assert_eq!(
            fleet,
            vec![18, 19, 20],
            "headers 11, 12 and the status at 12"
        );
        let rec = s.node("n1").unwrap().unwrap();
        assert_eq!((rec.indexed_top, rec.head.unwrap().height), (12, 12));
        assert_eq!(rec.redelivered_headers, 6);
        let log = s.events("n1", 1, 100).unwrap();
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "every seq in the log");
        let heights = |f: fn(&Kind) -> Option<u64>| -> Vec<u64> {
            log.iter()
                .filter_map(|e| e.kind.as_ref().and_then(f))
                .collect()
        };
        let headers = heights(|k| match k {
            Kind::Header(h) => Some(h.height),
            _ => None,
        });
        assert_eq!(headers, (1..=12).collect::<Vec<_>>());
        let resent = heights(|k| match k {
            Kind::Resent(r) => Some(r.height),
            _ => None,
        });
        assert_eq!(resent, (5..=10).collect::<Vec<_>>());
    }

    /// A status at the same lower height twice is not an agent on its way
    /// up: the node went back.
    #[tokio::test]
    async fn a_restored_agent_that_stays_below_reports_the_node_going_back() {
        let (_dir, s, mut catch_up) = restored_agent().await;
        let p = s
            .persist("n1", vec![status_on_chain(11, 6)], 0, &mut catch_up)
            .await
            .unwrap();
        assert!(p.events.is_empty());
        assert_eq!(s.node("n1").unwrap().unwrap().indexed_top, 10);
        let p = s
            .persist("n1", vec![status_on_chain(12, 6)], 0, &mut catch_up)
            .await
            .unwrap();
        assert_eq!(p.events.len(), 1);
        assert_eq!(s.node("n1").unwrap().unwrap().indexed_top, 6);
        assert_eq!(catch_up, None);
    }

    /// A restored agent whose node moved to other blocks meanwhile: the
    /// first header that differs from the index is the node's, and so is
    /// what follows.
    #[tokio::test]
    async fn a_restored_agent_whose_node_changed_blocks_is_taken_at_its_word() {
        let (_dir, s, mut catch_up) = restored_agent().await;
        let mut other = header_event(11, 5);
        if let Some(Kind::Header(h)) = &mut other.kind {
            h.hash = vec![0xee; 32];
        }
        let p = s
            .persist("n1", vec![other, status_on_chain(12, 4)], 0, &mut catch_up)
            .await
            .unwrap();
        assert_eq!(p.events.len(), 2);
        assert_eq!(catch_up, None);
        assert_eq!(s.node("n1").unwrap().unwrap().indexed_top, 4);
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    fn status_event(seq: u64, height: u64) -> proto::Event {
        proto::Event {
            seq,
            at_unix_ms: 0,
            kind: Some(Kind::Status(proto::NodeStatus {
                head_height: height,
                head_hash: vec![7; 32],
                ..Default::default()
            })),
        }
    }

    fn header_at(seq: u64, height: u64) -> proto::Event {
        proto::Event {
            seq,
            at_unix_ms: 0,
            kind: Some(Kind::Header(proto::Header {
                height,
                hash: vec![1; 32],
                ..Default::default()
            })),
        }
    }

    /// A header at 2^60 and then a status at 5 must cost what is stored,
    /// not the 2^54 chunk indices between the two heights.
    #[test]
    fn a_huge_height_then_a_low_one_costs_only_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let (done, finished) = std::sync::mpsc::channel();
        // Its own thread: an unbounded walk would never yield to a timer.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let heights = rt.block_on(async {
                let s = CentralStore::open(&path, 1 << 20, Durability::ProcessCrash).unwrap();
                s.persist(
                    "n1",
                    (1..=3).map(|i| header_at(i, i)).collect(),
                    0,
                    &mut None,
                )
                .await
                .unwrap();
                s.persist("n1", vec![header_at(4, 1 << 60)], 0, &mut None)
                    .await
                    .unwrap();
                s.persist("n1", vec![status_event(5, 2)], 0, &mut None)
                    .await
                    .unwrap();
                s.headers("n1", 0, u64::MAX)
                    .unwrap()
                    .iter()
                    .map(|h| h.height)
                    .collect::<Vec<u64>>()
            });
            let _ = done.send(heights);
        });
        let heights = finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("work bounded by the stored headers");
        assert_eq!(heights, vec![1, 2]);
    }

    #[tokio::test]
    async fn a_seq_gap_without_a_gap_event_is_counted_and_returned() {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        let p = s
            .persist(
                "n1",
                (1..=3).map(|i| header_at(i, i)).collect(),
                0,
                &mut None,
            )
            .await
            .unwrap();
        assert!(p.missing.is_empty());
        let p = s
            .persist(
                "n1",
                vec![header_at(7, 4), header_at(8, 5), header_at(10, 6)],
                0,
                &mut None,
            )
            .await
            .unwrap();
        assert_eq!(p.missing, vec![(4, 6), (9, 9)]);
        let rec = s.node("n1").unwrap().unwrap();
        assert_eq!((rec.last_seq, rec.missing_events), (10, 4));
        // A gap event covers its range: nothing is missing.
        let gap = proto::Event {
            seq: 11,
            at_unix_ms: 0,
            kind: Some(Kind::Gap(proto::Gap {
                last_seq: 20,
                dropped: 10,
            })),
        };
        let p = s
            .persist("n1", vec![gap, header_at(21, 7)], 0, &mut None)
            .await
            .unwrap();
        assert!(p.missing.is_empty());
        assert_eq!(s.node("n1").unwrap().unwrap().missing_events, 4);
    }

    #[tokio::test]
    async fn seqs_and_heights_at_the_top_of_u64_do_not_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let s = CentralStore::open(dir.path(), 1 << 20, Durability::ProcessCrash).unwrap();
        s.persist("n1", vec![header_at(u64::MAX, u64::MAX)], 0, &mut None)
            .await
            .unwrap();
        let p = s
            .persist(
                "n1",
                vec![header_at(u64::MAX, 1), status_event(3, 0)],
                0,
                &mut None,
            )
            .await
            .unwrap();
        assert_eq!(p.duplicates, 2);
        assert_eq!(s.node("n1").unwrap().unwrap().last_seq, u64::MAX);
    }
}
