//! The agent's store: headers by height, findings, the last node status, and
//! the outbox with its seq counter, all in one sled tree so that one atomic
//! batch writes an event, its seq and what it changes.
//!
//! Keys: `h`+height → Header, `f`+id → Finding (latest state), `k`+kind →
//! the open Finding of that kind, `o`+first seq → outbox record (last seq as
//! 8 bytes, then an encoded Batch), `m`+name → counters and status.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::watch;

use super::{decode, key_tail_u64, key_u64, u64_value, Durability, StoreError};
use crate::model::Header;
use crate::proto::{self, event::Kind};

const NEXT_SEQ: &[u8] = b"mnext_seq";
const OUTBOX_BYTES: &[u8] = b"moutbox_bytes";
const DROPPED: &[u8] = b"mdropped";
const STATUS: &[u8] = b"mstatus";
/// The last seq the store held when it was opened and the aggregator had not
/// yet confirmed it: events up to it were assigned before, and the aggregator
/// may hold them; events above it are this run's. Cleared at the first
/// reconcile.
const UNCONFIRMED_AFTER: &[u8] = b"munconfirmed_after";
/// The witness file's name in the store's directory.
const WITNESS: &str = "outpost-witness";

/// The witness file: the highest durable seq, then the marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witness {
    pub durable: u64,
    pub marker: Marker,
}

/// The unconfirmed-after marker as a witness saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Written by an older agent, which did not record it.
    Unknown,
    /// The aggregator had confirmed the store: every event was assigned in
    /// a run that reached it.
    Cleared,
    /// Events above this seq were assigned in runs that had not yet
    /// reached the aggregator.
    At(u64),
}

impl Witness {
    fn parse(text: &str) -> Option<Witness> {
        let mut lines = text.lines();
        let durable = lines.next()?.trim().parse().ok()?;
        let marker = match lines.next().map(str::trim) {
            Some("confirmed") => Marker::Cleared,
            Some(l) => match l.strip_prefix("unconfirmed-after ").map(str::parse) {
                Some(Ok(m)) => Marker::At(m),
                _ => Marker::Unknown,
            },
            None => Marker::Unknown,
        };
        Some(Witness { durable, marker })
    }

    fn text(&self) -> String {
        match self.marker {
            Marker::At(m) => format!("{}\nunconfirmed-after {m}\n", self.durable),
            Marker::Cleared => format!("{}\nconfirmed\n", self.durable),
            Marker::Unknown => format!("{}\n", self.durable),
        }
    }

    /// Replaces the witness in `dir` atomically and durably.
    fn write(&self, dir: &Path) -> Result<(), StoreError> {
        use std::io::Write as _;
        let path = dir.join(WITNESS);
        let tmp = dir.join(format!(".{WITNESS}.tmp"));
        let io = |source| StoreError::Sync {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(self.text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// After a restore: the marker the restored agent store (`tree`, last seq
/// `restored_last`) should carry, given the witness of the store it
/// replaces. A snapshot taken before its run reached the aggregator holds
/// that run's marker; if the lost store's witness shows that a run reached
/// the aggregator after it, the snapshot's events up to `restored_last`
/// were sent, and counting them as new would duplicate them.
pub fn settle_restored_marker(
    tree: &sled::Tree,
    restored_last: u64,
    witness: Option<Witness>,
) -> Result<(), StoreError> {
    let Some(marker) = tree.get(UNCONFIRMED_AFTER)?.map(|v| u64_value(Some(v))) else {
        // Opening sets it to the last seq: everything restored was assigned
        // in a confirmed run.
        return Ok(());
    };
    let confirmed = match witness.map(|w| (w.durable, w.marker)) {
        Some((durable, Marker::Cleared)) => durable,
        Some((_, Marker::At(m))) => m,
        Some((_, Marker::Unknown)) | None => return Ok(()),
    };
    let settled = marker.max(confirmed.min(restored_last));
    if settled != marker {
        tree.insert(UNCONFIRMED_AFTER, &settled.to_be_bytes())?;
        tracing::info!(
            snapshot_marker = marker,
            settled,
            "restored store: events up to seq {settled} were sent after the snapshot was taken"
        );
    }
    Ok(())
}

/// Counters guarded together: the seq counter and the outbox size change in
/// the same batches.
struct Counters {
    next_seq: u64,
    outbox_bytes: u64,
    dropped: u64,
}

/// One aggregator the outbox is delivered to, as the reporter last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delivery {
    pub aggregator: String,
    /// The highest seq it holds, from its Welcome and acknowledgements.
    pub acked: u64,
    pub connected: bool,
}

#[derive(Clone)]
pub struct LocalStore {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
    durability: Durability,
    quota_bytes: u64,
    counters: Arc<Mutex<Counters>>,
    durable_tx: Arc<watch::Sender<u64>>,
    /// The reporter's writes (acks, reconcile) hold it shared; a snapshot
    /// holds it alone, so it never sees half of an ack (sled's iterators
    /// are not a point-in-time view). Validate's own writes wait in its
    /// mailbox while it takes a snapshot.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Where the outbox goes; a record leaves it once every aggregator here
    /// holds it. In memory: each stream's Welcome says again where its
    /// aggregator stands.
    deliveries: Arc<Mutex<Vec<Delivery>>>,
}

/// What one validation step writes, atomically.
#[derive(Default)]
pub struct Commit {
    pub events: Vec<Kind>,
    /// Headers to (re)write in the height index.
    pub headers: Vec<Header>,
    /// Drop indexed headers above this height (the node's chain got shorter).
    pub truncate_above: Option<u64>,
    /// Replaces the headers kept from a branch the node gave up (see
    /// `retracted`); None leaves them as they are.
    pub retracted: Option<Vec<Header>>,
    pub findings: Vec<proto::Finding>,
    pub status: Option<proto::NodeStatus>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Committed {
    /// Seqs given to the commit's events, first to last; empty when it had none.
    pub seqs: Option<(u64, u64)>,
    /// Events dropped from the outbox to stay within the quota.
    pub dropped: u64,
}

/// One outbox record as the reporter reads it.
#[derive(Debug, Clone)]
pub struct Record {
    pub first_seq: u64,
    pub last_seq: u64,
    pub batch: proto::Batch,
}

/// The last seq an agent store assigned, read from its sled database.
pub fn last_seq_of(db: &sled::Db) -> Result<u64, StoreError> {
    Ok(u64_value(db.open_tree("agent")?.get(NEXT_SEQ)?).max(1) - 1)
}

impl LocalStore {
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        durability: Durability,
        quota_bytes: u64,
    ) -> Result<LocalStore, StoreError> {
        let db = super::open_db(dir, cache_bytes)?;
        let tree = db.open_tree("agent")?;
        let next_seq = u64_value(tree.get(NEXT_SEQ)?).max(1);
        if tree.get(UNCONFIRMED_AFTER)?.is_none() {
            tree.insert(UNCONFIRMED_AFTER, &(next_seq - 1).to_be_bytes())?;
        }
        let counters = Counters {
            next_seq,
            outbox_bytes: u64_value(tree.get(OUTBOX_BYTES)?),
            dropped: u64_value(tree.get(DROPPED)?),
        };
        // What a reopened store holds was read back from disk: it is durable.
        let (durable_tx, _) = watch::channel(next_seq - 1);
        Ok(LocalStore {
            db,
            tree,
            dir: dir.to_path_buf(),
            durability,
            quota_bytes,
            counters: Arc::new(Mutex::new(counters)),
            durable_tx: Arc::new(durable_tx),
            gate: Arc::default(),
            deliveries: Arc::new(Mutex::new(vec![Delivery::default()])),
        })
    }

    /// Names the aggregators the outbox is delivered to, in the order the
    /// reporter numbers them; before any of them has said what it holds.
    pub fn deliver_to(&self, aggregators: &[String]) {
        *self.lock_deliveries() = aggregators
            .iter()
            .map(|a| Delivery {
                aggregator: a.clone(),
                ..Default::default()
            })
            .collect();
    }

    /// Each aggregator's delivery, as the reporter last saw it.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock_deliveries().clone()
    }

    /// Whether the reporter's stream to aggregator `to` is up.
    pub fn set_connected(&self, to: usize, up: bool) {
        if let Some(d) = self.lock_deliveries().get_mut(to) {
            d.connected = up;
        }
    }

    fn lock_deliveries(&self) -> std::sync::MutexGuard<'_, Vec<Delivery>> {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that aggregator `to` holds every seq up to `upto` (`raise`:
    /// only if higher than known, as an acknowledgement; else as a Welcome
    /// says), and returns the seq every aggregator holds.
    fn held_by(&self, to: usize, upto: u64, raise: bool) -> u64 {
        let mut d = self.lock_deliveries();
        if let Some(one) = d.get_mut(to) {
            one.acked = if raise { one.acked.max(upto) } else { upto };
        }
        d.iter().map(|x| x.acked).min().unwrap_or(0)
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A poisoned lock can only come from a panic, and the binary aborts on panic.
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Bytes free on the store's filesystem.
    pub fn free_bytes(&self) -> Option<u64> {
        super::free_bytes(&self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The highest seq ever assigned (0 for a new store).
    pub fn last_seq(&self) -> u64 {
        self.counters().next_seq - 1
    }

    pub fn dropped_events(&self) -> u64 {
        self.counters().dropped
    }

    pub fn outbox_bytes(&self) -> u64 {
        self.counters().outbox_bytes
    }

    /// `store.outbox_quota_bytes`: past it, the oldest telemetry goes.
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    /// Records, in a small file beside sled's own, the highest seq known to
    /// be durable, and the unconfirmed-after marker. sled recovers from a
    /// damaged log by dropping everything after the damage, and opens
    /// without an error; a store that opens holding less than its witness
    /// says has lost events. The marker tells a restore which of a
    /// snapshot's events the aggregator may already hold.
    pub fn write_witness(&self) -> Result<(), StoreError> {
        let witness = Witness {
            durable: *self.durable_tx.borrow(),
            marker: match self.tree.get(UNCONFIRMED_AFTER)? {
                Some(v) => Marker::At(u64_value(Some(v))),
                None => Marker::Cleared,
            },
        };
        witness.write(&self.dir)
    }

    /// What the store's witness file holds, if there is one.
    pub fn witness(dir: &Path) -> Option<Witness> {
        Witness::parse(&std::fs::read_to_string(dir.join(WITNESS)).ok()?)
    }

    /// Reads every entry back and checks that it decodes and that the outbox
    /// lies below the seq counter: the start-up integrity check.
    pub fn check(&self) -> Result<(), StoreError> {
        let next_seq = self.counters().next_seq;
        let corrupt = |key: &[u8], reason: String| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        };
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            match k.first() {
                Some(b'h') => {
                    decode::<proto::Header>(&k, &v)?;
                }
                Some(b'f') | Some(b'k') => {
                    decode::<proto::Finding>(&k, &v)?;
                }
                Some(b'o') => {
                    let (last, batch) = decode_record(&k, &v)?;
                    if last >= next_seq || batch.events.last().map(event_last_seq) != Some(last) {
                        return Err(corrupt(
                            &k,
                            format!(
                                "outbox record ends at seq {last}, the counter is at {next_seq}"
                            ),
                        ));
                    }
                }
                Some(b'm') => {}
                _ => return Err(corrupt(&k, "unknown key".into())),
            }
        }
        Ok(())
    }

    /// Seqs up to this one are on disk and may be sent.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable_tx.subscribe()
    }

    pub fn header(&self, height: u64) -> Result<Option<Header>, StoreError> {
        let key = key_u64(b"h", height);
        match self.tree.get(&key)? {
            Some(v) => Ok(Some(Header::from_proto(&decode::<proto::Header>(
                &key, &v,
            )?))),
            None => Ok(None),
        }
    }

    /// The indexed headers from `from` up, lowest first.
    pub fn headers_from(&self, from: u64) -> Result<Vec<Header>, StoreError> {
        self.tree
            .range(key_u64(b"h", from)..=key_u64(b"h", u64::MAX))
            .map(|kv| {
                let (k, v) = kv?;
                Ok(Header::from_proto(&decode::<proto::Header>(&k, &v)?))
            })
            .collect()
    }

    /// Headers of a branch the node gave up when its head went lower, kept
    /// until the node shows what replaced them.
    pub fn retracted(&self) -> Result<Vec<Header>, StoreError> {
        self.tree
            .scan_prefix(b"r")
            .map(|kv| {
                let (k, v) = kv?;
                Ok(Header::from_proto(&decode::<proto::Header>(&k, &v)?))
            })
            .collect()
    }

    /// The highest indexed header.
    pub fn head(&self) -> Result<Option<Header>, StoreError> {
        match self.tree.scan_prefix(b"h").next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(Header::from_proto(&decode::<proto::Header>(&k, &v)?)))
            }
            None => Ok(None),
        }
    }

    pub fn open_findings(&self) -> Result<Vec<proto::Finding>, StoreError> {
        self.tree
            .scan_prefix(b"k")
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn findings(&self) -> Result<Vec<proto::Finding>, StoreError> {
        self.tree
            .scan_prefix(b"f")
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn status(&self) -> Result<Option<proto::NodeStatus>, StoreError> {
        match self.tree.get(STATUS)? {
            Some(v) => Ok(Some(decode(STATUS, &v)?)),
            None => Ok(None),
        }
    }

    /// Writes one validation step atomically: events get the next seqs and go
    /// into one outbox record, with the counter, index and findings they change.
    /// The events are not yet durable: call `flush` before they may be sent.
    pub fn commit(&self, commit: Commit, now_ms: i64) -> Result<Committed, StoreError> {
        let mut c = self.counters();
        let mut batch = sled::Batch::default();
        let mut out = Committed::default();

        if let Some(h) = commit.truncate_above {
            for kv in self
                .tree
                .range(key_u64(b"h", h + 1)..key_u64(b"h", u64::MAX))
            {
                batch.remove(kv?.0);
            }
        }
        for h in &commit.headers {
            batch.insert(key_u64(b"h", h.height), h.to_proto().encode_to_vec());
        }
        if let Some(kept) = &commit.retracted {
            for kv in self.tree.scan_prefix(b"r") {
                batch.remove(kv?.0);
            }
            for h in kept {
                batch.insert(key_u64(b"r", h.height), h.to_proto().encode_to_vec());
            }
        }
        for f in &commit.findings {
            let kind_key = [b"k".as_slice(), f.kind().label().as_bytes()].concat();
            if f.state() == proto::FindingState::Open {
                batch.insert(kind_key, f.encode_to_vec());
            } else if f.state() == proto::FindingState::Resolved {
                batch.remove(kind_key);
            }
            batch.insert(
                [b"f".as_slice(), f.id.as_bytes()].concat(),
                f.encode_to_vec(),
            );
        }
        if let Some(s) = &commit.status {
            batch.insert(STATUS, s.encode_to_vec());
        }

        let mut next = c.next_seq;
        if !commit.events.is_empty() {
            let first = next;
            let events: Vec<proto::Event> = commit
                .events
                .into_iter()
                .map(|kind| {
                    let e = proto::Event {
                        seq: next,
                        at_unix_ms: now_ms,
                        kind: Some(kind),
                    };
                    next += 1;
                    e
                })
                .collect();
            let last = next - 1;
            let value = encode_record(last, &proto::Batch { events, pending: 0 });
            let size = value.len() as u64;
            out.dropped = self.make_room(&mut c, &mut batch, size)?;
            batch.insert(key_u64(b"o", first), value);
            c.outbox_bytes += size;
            out.seqs = Some((first, last));
        }
        batch.insert(NEXT_SEQ, &next.to_be_bytes());
        batch.insert(OUTBOX_BYTES, &c.outbox_bytes.to_be_bytes());
        batch.insert(DROPPED, &c.dropped.to_be_bytes());
        self.tree.apply_batch(batch)?;
        c.next_seq = next;
        Ok(out)
    }

    /// Frees outbox space for `incoming` bytes by replacing the oldest
    /// low-value events with gaps. Findings and gaps are never dropped.
    fn make_room(
        &self,
        c: &mut Counters,
        batch: &mut sled::Batch,
        incoming: u64,
    ) -> Result<u64, StoreError> {
        let mut dropped = 0;
        if c.outbox_bytes + incoming <= self.quota_bytes {
            return Ok(0);
        }
        for kv in self.tree.scan_prefix(b"o") {
            if c.outbox_bytes + incoming <= self.quota_bytes {
                break;
            }
            let (k, v) = kv?;
            let (last, record) = decode_record(&k, &v)?;
            let (kept, n) = drop_telemetry(record);
            if n == 0 {
                continue;
            }
            let value = encode_record(last, &kept);
            c.outbox_bytes = c.outbox_bytes - v.len() as u64 + value.len() as u64;
            batch.insert(k, value);
            dropped += n;
        }
        c.dropped += dropped;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                quota_bytes = self.quota_bytes,
                "outbox quota reached: dropped the oldest telemetry events (findings kept)"
            );
        }
        Ok(dropped)
    }

    /// Makes every committed event durable and publishes the new watermark.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let upto = self.last_seq();
        super::flush(&self.db, &self.dir, self.durability).await?;
        self.durable_tx.send_if_modified(|d| {
            let advanced = upto > *d;
            if advanced {
                *d = upto;
            }
            advanced
        });
        Ok(())
    }

    /// Outbox records holding seqs above `after`, oldest first, up to about
    /// `max_events` events (always at least one record if there is one).
    pub fn records_after(&self, after: u64, max_events: usize) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let mut count = 0;
        // The record holding `after + 1` may start at or below `after`.
        let start = self
            .tree
            .range(key_u64(b"o", 0)..=key_u64(b"o", after))
            .next_back()
            .transpose()?
            .map(|(k, _)| k.to_vec())
            .unwrap_or_else(|| key_u64(b"o", after + 1));
        for kv in self.tree.range(start..key_u64(b"o", u64::MAX)) {
            let (k, v) = kv?;
            let first_seq = key_tail_u64(&k).unwrap_or(0);
            if record_last_seq(&k, &v)? <= after {
                continue;
            }
            let (last_seq, mut batch) = decode_record(&k, &v)?;
            batch.events.retain(|e| e.seq > after);
            count += batch.events.len();
            out.push(Record {
                first_seq,
                last_seq,
                batch,
            });
            if count >= max_events {
                break;
            }
        }
        Ok(out)
    }

    /// Aggregator `from` (of `deliver_to`; 0 when there is one) stored every
    /// event up to `upto`: deletes the outbox records that every aggregator
    /// has.
    pub async fn ack(&self, from: usize, upto: u64) -> Result<usize, StoreError> {
        let _g = self.gate.read().await;
        let all = self.held_by(from, upto, true);
        self.ack_now(all)
    }

    /// Writes a snapshot of the store into `dir`, with no ack or reconcile
    /// under way. Blocks: call it from `spawn_blocking`.
    pub fn snapshot(
        &self,
        meta: super::snapshot::Meta,
        dir: &Path,
    ) -> Result<super::snapshot::Written, super::snapshot::SnapshotError> {
        let _only = self.gate.blocking_write();
        super::snapshot::create(&self.db, meta, dir)
    }

    fn ack_now(&self, upto: u64) -> Result<usize, StoreError> {
        let mut c = self.counters();
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut freed = 0u64;
        for kv in self.tree.range(key_u64(b"o", 0)..=key_u64(b"o", upto)) {
            let (k, v) = kv?;
            let last = record_last_seq(&k, &v)?;
            if last > upto {
                break;
            }
            freed += v.len() as u64;
            batch.remove(k);
            removed += 1;
        }
        if removed > 0 {
            c.outbox_bytes = c.outbox_bytes.saturating_sub(freed);
            batch.insert(OUTBOX_BYTES, &c.outbox_bytes.to_be_bytes());
            self.tree.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// Lines the store up with what the aggregator holds (`aggregator_last`).
    /// Normally that drops what it already has. If the aggregator holds seqs
    /// above what this store held when it was opened (the store was restored
    /// from a snapshot or lost its tail in a power loss), the events the store
    /// held at opening are ones the aggregator already has, and are dropped;
    /// the events made since reuse seqs the aggregator holds for other events,
    /// so they get fresh seqs above the aggregator's, and the counter
    /// continues from there. Returns how many events were renumbered.
    ///
    /// The marker's removal is made durable before this returns: events
    /// sent after it and acknowledged must never be taken, after a crash,
    /// for events the aggregator lacks and renumbered into duplicates.
    ///
    /// `with` is the aggregator's place in `deliver_to` (0 when there is
    /// one); the outbox keeps what the others lack. Renumbering is for the
    /// whole outbox: if the store lost events and the aggregators disagree
    /// on what they hold, the one that held less meets a seq gap (a finding
    /// there).
    pub async fn reconcile(&self, with: usize, aggregator_last: u64) -> Result<u64, StoreError> {
        let renumbered = {
            let _g = self.gate.read().await;
            self.line_up(with, aggregator_last)?
        };
        self.flush().await?;
        self.write_witness()?;
        Ok(renumbered)
    }

    fn line_up(&self, with: usize, aggregator_last: u64) -> Result<u64, StoreError> {
        let local_last = self.last_seq();
        let held_at_open = self
            .tree
            .get(UNCONFIRMED_AFTER)?
            .map_or(local_last, |v| u64_value(Some(v)));
        if aggregator_last <= held_at_open {
            let all = self.held_by(with, aggregator_last, false);
            self.ack_now(all)?;
            self.tree.remove(UNCONFIRMED_AFTER)?;
            return Ok(0);
        }
        self.ack_now(held_at_open)?;
        self.held_by(with, aggregator_last, false);
        let mut c = self.counters();
        let mut batch = sled::Batch::default();
        batch.remove(UNCONFIRMED_AFTER);
        let mut next = aggregator_last + 1;
        let mut renumbered = 0;
        // A batch keeps the last operation per key: every old key is removed
        // first, so a new key equal to an old one is not removed again.
        let mut moved = Vec::new();
        // Renumbered records change size: seqs are varints.
        let mut bytes = c.outbox_bytes;
        for kv in self.tree.scan_prefix(b"o") {
            let (k, v) = kv?;
            bytes = bytes.saturating_sub(v.len() as u64);
            let (_, mut record) = decode_record(&k, &v)?;
            let first = next;
            for e in &mut record.events {
                let span = match &mut e.kind {
                    Some(Kind::Gap(g)) => g.last_seq - e.seq,
                    _ => 0,
                };
                e.seq = next;
                if let Some(Kind::Gap(g)) = &mut e.kind {
                    g.last_seq = next + span;
                }
                next += span + 1;
                renumbered += 1;
            }
            batch.remove(k);
            moved.push((key_u64(b"o", first), encode_record(next - 1, &record)));
        }
        for (k, v) in moved {
            bytes += v.len() as u64;
            batch.insert(k, v);
        }
        batch.insert(NEXT_SEQ, &next.to_be_bytes());
        batch.insert(OUTBOX_BYTES, &bytes.to_be_bytes());
        self.tree.apply_batch(batch)?;
        c.outbox_bytes = bytes;
        tracing::warn!(
            local_last,
            aggregator_last,
            renumbered,
            "the aggregator holds more events than this store assigned; pending events get new seqs"
        );
        c.next_seq = next;
        Ok(renumbered)
    }

    /// Keeps only the newest `keep` indexed headers below `head`.
    pub fn prune_headers(&self, head: u64, keep: u64) -> Result<usize, StoreError> {
        let Some(cutoff) = head.checked_sub(keep) else {
            return Ok(0);
        };
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.tree.range(key_u64(b"h", 0)..key_u64(b"h", cutoff + 1)) {
            batch.remove(kv?.0);
            n += 1;
        }
        if n > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(n)
    }
}

fn encode_record(last_seq: u64, batch: &proto::Batch) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + batch.encoded_len());
    v.extend_from_slice(&last_seq.to_be_bytes());
    batch.encode(&mut v).expect("Vec grows as needed");
    v
}

/// The record's last seq, read from its 8-byte prefix without decoding it.
fn record_last_seq(key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    v.get(..8)
        .and_then(|h| <[u8; 8]>::try_from(h).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: format!("o{}", key_tail_u64(key).unwrap_or(0)),
            reason: "record shorter than 8 bytes".into(),
        })
}

fn decode_record(key: &[u8], v: &[u8]) -> Result<(u64, proto::Batch), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: format!("o{}", key_tail_u64(key).unwrap_or(0)),
        reason,
    };
    let head: [u8; 8] = v
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| corrupt("record shorter than 8 bytes".into()))?;
    let batch = proto::Batch::decode(&v[8..]).map_err(|e| corrupt(e.to_string()))?;
    Ok((u64::from_be_bytes(head), batch))
}

/// Replaces every run of droppable events with one gap event.
fn drop_telemetry(record: proto::Batch) -> (proto::Batch, u64) {
    let mut kept: Vec<proto::Event> = Vec::new();
    let mut dropped = 0;
    for e in record.events {
        let droppable = matches!(e.kind, Some(Kind::Header(_)) | Some(Kind::Status(_)));
        if !droppable {
            kept.push(e);
            continue;
        }
        dropped += 1;
        if let Some(proto::Event {
            kind: Some(Kind::Gap(g)),
            ..
        }) = kept.last_mut()
        {
            if g.last_seq + 1 == e.seq {
                g.last_seq = e.seq;
                g.dropped += 1;
                continue;
            }
        }
        kept.push(proto::Event {
            seq: e.seq,
            at_unix_ms: e.at_unix_ms,
            kind: Some(Kind::Gap(proto::Gap {
                last_seq: e.seq,
                dropped: 1,
            })),
        });
    }
    (
        proto::Batch {
            events: kept,
            pending: 0,
        },
        dropped,
    )
}

/// The highest seq an event covers (a gap covers a range).
pub fn event_last_seq(e: &proto::Event) -> u64 {
    match &e.kind {
        Some(Kind::Gap(g)) => g.last_seq.max(e.seq),
        _ => e.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Hash;

    fn header(h: u64) -> Header {
        Header {
            height: h,
            hash: Hash(vec![h as u8; 32]),
            parent_hash: Hash(vec![h.wrapping_sub(1) as u8; 32]),
            timestamp: h as i64,
            raw: None,
        }
    }

    fn header_commit(heights: std::ops::RangeInclusive<u64>) -> Commit {
        let headers: Vec<Header> = heights.map(header).collect();
        Commit {
            events: headers.iter().map(|h| Kind::Header(h.to_proto())).collect(),
            headers,
            ..Default::default()
        }
    }

    /// Opens the store at `dir` (`open_db` waits out the lock of a store
    /// dropped just before).
    fn open(dir: &Path, quota: u64) -> LocalStore {
        LocalStore::open(dir, 1 << 20, Durability::ProcessCrash, quota).unwrap()
    }

    #[test]
    fn seqs_are_contiguous_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path(), 1 << 20);
            assert_eq!(
                s.commit(header_commit(1..=3), 0).unwrap().seqs,
                Some((1, 3))
            );
            assert_eq!(
                s.commit(header_commit(4..=4), 0).unwrap().seqs,
                Some((4, 4))
            );
            s.db.flush().unwrap();
        }
        let s = open(dir.path(), 1 << 20);
        assert_eq!(s.last_seq(), 4);
        assert_eq!(*s.durable().borrow(), 4);
        assert_eq!(s.head().unwrap().unwrap().height, 4);
        assert_eq!(
            s.commit(header_commit(5..=5), 0).unwrap().seqs,
            Some((5, 5))
        );
    }

    #[tokio::test]
    async fn records_after_splits_a_partly_sent_record_and_ack_deletes_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
        s.commit(header_commit(1..=3), 0).unwrap();
        s.commit(header_commit(4..=6), 0).unwrap();
        let recs = s.records_after(2, 100).unwrap();
        let seqs: Vec<u64> = recs
            .iter()
            .flat_map(|r| r.batch.events.iter().map(|e| e.seq))
            .collect();
        assert_eq!(seqs, vec![3, 4, 5, 6]);
        assert_eq!(
            s.ack(0, 4).await.unwrap(),
            1,
            "only the record ending at 3 is wholly acked"
        );
        assert_eq!(s.records_after(0, 100).unwrap()[0].first_seq, 4);
        assert_eq!(s.ack(0, 6).await.unwrap(), 1);
        assert!(s.records_after(0, 100).unwrap().is_empty());
        assert_eq!(s.outbox_bytes(), 0);
    }

    /// The seqs the outbox still holds.
    fn outbox(s: &LocalStore) -> Vec<u64> {
        s.records_after(0, 1000)
            .unwrap()
            .iter()
            .flat_map(|r| r.batch.events.iter().map(|e| e.seq))
            .collect()
    }

    #[tokio::test]
    async fn an_event_leaves_the_outbox_once_every_aggregator_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
        s.deliver_to(&["https://a:1".into(), "https://b:1".into()]);
        for h in 1..=5 {
            s.commit(header_commit(h..=h), 0).unwrap();
        }
        s.reconcile(0, 0).await.unwrap();
        s.reconcile(1, 0).await.unwrap();
        s.ack(0, 5).await.unwrap();
        assert_eq!(outbox(&s), vec![1, 2, 3, 4, 5], "b holds none of them");
        s.ack(1, 3).await.unwrap();
        assert_eq!(outbox(&s), vec![4, 5]);
        // b's stream breaks and its Welcome says where it stands.
        s.reconcile(1, 4).await.unwrap();
        assert_eq!(outbox(&s), vec![5]);
        let held: Vec<(String, u64)> = s
            .deliveries()
            .into_iter()
            .map(|d| (d.aggregator, d.acked))
            .collect();
        assert_eq!(
            held,
            vec![("https://a:1".into(), 5), ("https://b:1".into(), 4)]
        );
        s.ack(1, 5).await.unwrap();
        assert_eq!(outbox(&s), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn reconcile_renumbers_when_the_aggregator_is_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
        s.commit(header_commit(1..=2), 0).unwrap();
        assert_eq!(s.reconcile(0, 10).await.unwrap(), 2);
        let seqs: Vec<u64> = s
            .records_after(10, 100)
            .unwrap()
            .iter()
            .flat_map(|r| r.batch.events.iter().map(|e| e.seq))
            .collect();
        assert_eq!(seqs, vec![11, 12]);
        assert_eq!(
            s.commit(header_commit(3..=3), 0).unwrap().seqs,
            Some((13, 13))
        );
    }

    #[tokio::test]
    async fn a_restored_store_drops_what_the_aggregator_holds_and_renumbers_only_new_events() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Events 1..=5 were sent before the store was lost; the snapshot
            // still has them pending.
            let s = open(dir.path(), 1 << 20);
            s.commit(header_commit(1..=5), 0).unwrap();
            s.reconcile(0, 0).await.unwrap();
            s.db.flush().unwrap();
        }
        let s = open(dir.path(), 1 << 20);
        // Made after the restore, before the aggregator was reached.
        s.commit(header_commit(6..=7), 0).unwrap();
        assert_eq!(s.reconcile(0, 9).await.unwrap(), 2);
        let events: Vec<(u64, u64)> = s
            .records_after(0, 100)
            .unwrap()
            .iter()
            .flat_map(|r| r.batch.events.iter())
            .map(|e| match &e.kind {
                Some(Kind::Header(h)) => (e.seq, h.height),
                _ => (e.seq, 0),
            })
            .collect();
        assert_eq!(events, vec![(10, 6), (11, 7)]);
        // Confirmed now: a later reconcile has nothing to renumber.
        assert_eq!(
            s.commit(header_commit(8..=8), 0).unwrap().seqs,
            Some((12, 12))
        );
        assert_eq!(s.reconcile(0, 11).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn new_events_are_renumbered_even_when_the_store_got_past_the_aggregator() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Welcomed as a new node, then 1..=5 made, sent and acknowledged.
            let s = open(dir.path(), 1 << 20);
            s.reconcile(0, 0).await.unwrap();
            s.commit(header_commit(1..=5), 0).unwrap();
            s.ack(0, 5).await.unwrap();
            s.db.flush().unwrap();
        }
        // Restored at seq 5 while the aggregator holds 7; four new events
        // take seqs 6..=9, two of which the aggregator holds for others.
        let s = open(dir.path(), 1 << 20);
        // Two records, the second starting where the first moves to.
        s.commit(header_commit(6..=7), 0).unwrap();
        s.commit(header_commit(8..=9), 0).unwrap();
        assert_eq!(s.reconcile(0, 7).await.unwrap(), 4);
        let seqs: Vec<u64> = s
            .records_after(0, 100)
            .unwrap()
            .iter()
            .flat_map(|r| r.batch.events.iter().map(|e| e.seq))
            .collect();
        assert_eq!(seqs, vec![8, 9, 10, 11]);
    }

    #[test]
    fn quota_drops_oldest_telemetry_into_gaps_and_keeps_findings() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 2_000);
        let finding = proto::Finding {
            id: "stall-1".into(),
            kind: proto::FindingKind::Stall as i32,
            state: proto::FindingState::Open as i32,
            ..Default::default()
        };
        let mut first = header_commit(1..=5);
        first.events.push(Kind::Finding(finding.clone()));
        s.commit(first, 0).unwrap();
        let mut dropped = 0;
        for i in 0..20 {
            dropped += s
                .commit(header_commit(6 + i * 5..=10 + i * 5), 0)
                .unwrap()
                .dropped;
        }
        assert!(dropped > 0);
        assert_eq!(s.dropped_events(), dropped);
        assert!(s.outbox_bytes() <= 2_000 + 1_000, "{}", s.outbox_bytes());
        let events: Vec<proto::Event> = s
            .records_after(0, 10_000)
            .unwrap()
            .into_iter()
            .flat_map(|r| r.batch.events)
            .collect();
        // The seq space stays contiguous: every seq is an event or inside a gap.
        let mut expect = 1;
        for e in &events {
            assert_eq!(e.seq, expect);
            expect = event_last_seq(e) + 1;
        }
        assert_eq!(expect, s.last_seq() + 1);
        assert!(events
            .iter()
            .any(|e| matches!(&e.kind, Some(Kind::Finding(f)) if f.id == "stall-1")));
    }

    /// Runs `steps` on the store at `dir` in a child process that then
    /// aborts, as `kill -9` would stop the agent: nothing unflushed survives.
    fn in_a_process_that_aborts(test: &str, dir: &Path) -> bool {
        if let Ok(d) = std::env::var("OUTPOST_CRASH_DIR") {
            assert_eq!(d, dir.display().to_string());
            return true;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("OUTPOST_CRASH_DIR", dir)
            .status()
            .unwrap();
        assert!(!status.success(), "the child aborts");
        false
    }

    #[tokio::test]
    async fn a_crash_after_the_first_acks_renumbers_nothing() {
        let test = "store::local::tests::a_crash_after_the_first_acks_renumbers_nothing";
        let dir = std::env::var("OUTPOST_CRASH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| tempfile::tempdir().unwrap().keep());
        if in_a_process_that_aborts(test, &dir) {
            // Made while the aggregator was away, durable; the marker says
            // the store held nothing the aggregator confirmed.
            let s = open(&dir, 1 << 20);
            s.commit(header_commit(1..=5), 0).unwrap();
            s.flush().await.unwrap();
            // Connected: the aggregator holds nothing yet; 1..=5 are sent,
            // stored and acknowledged. Then kill -9.
            s.reconcile(0, 0).await.unwrap();
            s.ack(0, 5).await.unwrap();
            std::process::abort();
        }
        let s = open(&dir, 1 << 20);
        // The aggregator holds 1..=5 now: they are the same events.
        assert_eq!(s.reconcile(0, 5).await.unwrap(), 0, "no event renumbered");
        assert!(s.records_after(5, 100).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn renumbering_keeps_the_outbox_byte_count_true() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
        s.commit(header_commit(1..=50), 0).unwrap();
        // Seqs of 1 byte become seqs of 6 bytes on the wire.
        assert_eq!(s.reconcile(0, 1 << 40).await.unwrap(), 50);
        let stored: u64 = s
            .tree
            .scan_prefix(b"o")
            .map(|kv| kv.unwrap().1.len() as u64)
            .sum();
        assert_eq!(s.outbox_bytes(), stored);
    }

    #[tokio::test]
    async fn committed_events_become_sendable_only_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
        let durable = s.durable();
        s.commit(header_commit(1..=3), 0).unwrap();
        assert_eq!(*durable.borrow(), 0, "committed is not yet durable");
        s.flush().await.unwrap();
        assert_eq!(*durable.borrow(), 3);
    }
}
