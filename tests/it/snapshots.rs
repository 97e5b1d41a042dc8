//! Snapshots of a running agent's store, retention, and start-up recovery
//! from a store damaged on disk.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, GetNodeRequest};
use outpost::store::local::LocalStore;
use outpost::store::Durability;

use crate::delivery::assert_complete;
use crate::harness::{hex, outpost_bin, wait_for, AgentOptions, Miner, Solo};
use crate::spine::{wait_at_head, wait_finding};

fn outpost(args: &[&str]) -> (bool, String) {
    let out = Command::new(outpost_bin()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `outpost snapshot create` against the running agent; returns the file.
fn snapshot_now(config: &Path) -> PathBuf {
    let (ok, text) = outpost(&["snapshot", "create", "--config", config.to_str().unwrap()]);
    assert!(ok, "snapshot create: {text}");
    let path = text
        .strip_prefix("wrote ")
        .and_then(|t| t.split(" (").next())
        .unwrap_or_else(|| panic!("unexpected output: {text}"));
    PathBuf::from(path)
}

fn snap_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn snapshots_of_a_running_agent_restore_and_rescue_a_damaged_store() {
    let Solo {
        world,
        anvil,
        agg,
        mut agent,
        mut q,
    } = Solo::start(AgentOptions {
        poll_interval: "50ms",
        block_time: "60s",
        extra_tables: "[snapshot]\ninterval = \"0s\"\nkeep = 2\n",
        ..Default::default()
    })
    .await;
    let anvil = Arc::new(anvil);
    let snap_dir = agent.data_dir.with_file_name("node-1-data-snapshots");
    anvil.mine(5).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;

    // Snapshots while blocks arrive every 50 ms.
    let miner = Miner::start(anvil.clone(), Duration::from_millis(50));
    let mut taken = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        taken.push(snapshot_now(&agent.config));
    }
    miner.stop().await;

    // Retention keeps the newest two.
    assert_eq!(snap_files(&snap_dir), taken[1..].to_vec());
    let newest = taken.last().unwrap().clone();
    let (ok, text) = outpost(&["snapshot", "verify", newest.to_str().unwrap()]);
    // One line: no progress bar when stderr is not a terminal.
    assert!(
        ok && text.contains("valid agent snapshot") && text.lines().count() == 1,
        "{text}"
    );

    // Restored into a fresh dir, it holds the store as it was at its seq:
    // the manifest's last seq, and anvil's header at every height it holds.
    let fresh = world.path().join("restored");
    let (ok, text) = outpost(&[
        "snapshot",
        "restore",
        newest.to_str().unwrap(),
        "--data-dir",
        fresh.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let (manifest, _) = outpost::store::snapshot::verify(&newest).unwrap();
    {
        let restored =
            LocalStore::open(&fresh, 1 << 20, Durability::ProcessCrash, u64::MAX).unwrap();
        restored.check().unwrap();
        assert_eq!(Some(restored.last_seq()), manifest.last_seq);
        let head = restored.head().unwrap().unwrap();
        assert_eq!(Some(head.height), manifest.head_height);
        for h in head.height.saturating_sub(20)..=head.height {
            let stored = restored.header(h).unwrap().expect("header kept");
            assert_eq!(hex(&stored.hash.0), anvil.hash(h).await, "height {h}");
        }
    }

    // The aggregator learns of the newest snapshot.
    let agent_log = agent.log.clone();
    let logs = [agent_log.as_path(), agg.log.as_path()];
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    wait_for(
        "the snapshot at the aggregator",
        Duration::from_secs(20),
        &logs,
        || {
            let mut c = q.clone();
            let name = name.clone();
            async move {
                let d = c
                    .get_node(GetNodeRequest {
                        node_id: "node-1".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let s = d.last_snapshot?;
                (s.file == name && s.bytes > 0 && s.last_seq == manifest.last_seq.unwrap())
                    .then_some(())
            }
        },
    )
    .await;

    // Blocks after the newest snapshot, which the restored agent reads
    // again. Then damage the stopped agent's store: sled opens it, but empty.
    anvil.mine(4).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    assert!(agent.terminate().unwrap().success());
    let db = agent.data_dir.join("db");
    let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[0xA5; 4096]).unwrap();
    drop(f);
    anvil.mine(3).await;
    agent.restart();

    let f = wait_finding(
        &q,
        "node-1",
        FindingKind::StoreRecovered,
        FindingState::Occurred,
        &logs,
    )
    .await;
    assert!(f.summary.contains(&name), "{}", f.summary);
    assert!(
        f.summary.contains("sled dropped a damaged part"),
        "{}",
        f.summary
    );
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.contains("ERROR") && log.contains(&name) && log.contains("before-restore"),
        "the error names both files:\n{log}"
    );
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    assert!(agent.terminate().unwrap().success());
    // Every seq once, every height with anvil's hash once, nothing taken as
    // a duplicate; the blocks after the snapshot were read again, and the
    // aggregator recognised them.
    let n = assert_complete(&mut q, "node-1", &anvil).await;
    let d = q
        .get_node(GetNodeRequest {
            node_id: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.summary.as_ref().unwrap().last_seq, n as u64);
    assert_eq!(d.duplicates_ignored, 0);
    assert!(
        d.redelivered_headers >= 4,
        "the blocks after the snapshot were read again: {d:?}"
    );
}

#[tokio::test]
async fn kill_9_while_a_snapshot_is_written_leaves_no_file_that_verifies_partially() {
    let Solo {
        world: _world,
        anvil,
        agg,
        mut agent,
        mut q,
    } = Solo::start(AgentOptions::default()).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    assert!(agent.terminate().unwrap().success());
    // A store big enough that writing its snapshot takes a while.
    {
        let store =
            LocalStore::open(&agent.data_dir, 1 << 20, Durability::ProcessCrash, u64::MAX).unwrap();
        let mut h = 1_000_000u64;
        for _ in 0..60 {
            let headers: Vec<outpost::model::Header> = (0..1000)
                .map(|i| {
                    h += 1;
                    outpost::model::Header {
                        height: h,
                        hash: outpost::model::Hash((h * 7919 + i).to_be_bytes().repeat(4)),
                        parent_hash: outpost::model::Hash(h.to_be_bytes().repeat(4)),
                        timestamp: h as i64,
                        raw: None,
                    }
                })
                .collect();
            let commit = outpost::store::local::Commit {
                events: headers
                    .iter()
                    .map(|h| outpost::proto::event::Kind::Header(h.to_proto()))
                    .collect(),
                headers,
                ..Default::default()
            };
            store.commit(commit, 0).unwrap();
        }
        store.flush().await.unwrap();
    }
    let out = agent.data_dir.with_file_name("node-1-data-snapshots");
    let create = || {
        Command::new(outpost_bin())
            .args([
                "snapshot",
                "create",
                "--config",
                agent.config.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let writing = |out: &Path| {
        std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        })
    };
    // kill -9 once the temp file is there, at three points of the write.
    for delay_ms in [0, 20, 60] {
        let mut child = create();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !writing(&out) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
    }
    // One that finishes.
    assert!(create().wait().unwrap().success());
    let partial: Vec<PathBuf> = std::fs::read_dir(&out)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !partial.is_empty(),
        "no kill landed while a snapshot was being written"
    );
    let finished = snap_files(&out);
    assert_eq!(
        finished.len(),
        1,
        "only the snapshot that finished is a .snap: {finished:?}"
    );
    let (ok, text) = outpost(&["snapshot", "verify", finished[0].to_str().unwrap()]);
    assert!(ok, "the finished snapshot verifies: {text}");
    let (ok, text) = outpost(&["snapshot", "list", out.to_str().unwrap()]);
    assert!(ok && !text.contains("INVALID"), "{text}");
    // A partial file never verifies, and the agent clears them at start.
    let (ok, _) = outpost(&["snapshot", "verify", partial[0].to_str().unwrap()]);
    assert!(!ok);
    agent.restart();
    let logs = [agent.log.as_path()];
    wait_for(
        "partial snapshots removed",
        Duration::from_secs(20),
        &logs,
        || {
            let gone = partial.iter().all(|p| !p.exists());
            async move { gone.then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn the_aggregator_snapshots_its_store_on_a_schedule_and_keeps_the_newest() {
    let world = crate::harness::World::new();
    let anvil = crate::harness::Anvil::start(&world, "anvil").await;
    let agg =
        crate::harness::Aggregator::start_with(&world, "[snapshot]\ninterval = \"1s\"\nkeep = 2\n")
            .await;
    let agent = crate::harness::Agent::start(
        &world,
        "node-1",
        &anvil.url(),
        &agg,
        AgentOptions::default(),
    );
    let mut q = world.query(&agg).await;
    anvil.mine(3).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let dir = world.path().join("aggregator-data-snapshots");
    let logs = [agg.log.as_path()];
    wait_for(
        "three snapshots, the oldest deleted",
        Duration::from_secs(30),
        &logs,
        || {
            let log = std::fs::read_to_string(&agg.log).unwrap_or_default();
            let kept = if dir.exists() {
                snap_files(&dir).len()
            } else {
                0
            };
            async move {
                (log.matches("snapshot written").count() >= 3
                    && log.contains("snapshot deleted by retention")
                    && kept == 2)
                    .then_some(())
            }
        },
    )
    .await;
    let newest = snap_files(&dir).pop().unwrap();
    let (manifest, _) = outpost::store::snapshot::verify(&newest).unwrap();
    assert_eq!(manifest.store, "aggregator");
    let fresh = world.path().join("aggregator-restored");
    outpost::store::snapshot::restore(&newest, &fresh, false).unwrap();
    let store =
        outpost::store::central::CentralStore::open(&fresh, 1 << 20, Durability::ProcessCrash)
            .unwrap();
    let rec = store.node("node-1").unwrap().expect("the node's record");
    assert!(rec.last_seq > 0 && rec.head.is_some(), "{rec:?}");
}
