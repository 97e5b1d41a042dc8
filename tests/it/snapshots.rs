//! Snapshots of a running agent's store, retention, and start-up recovery
//! from a store damaged on disk.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, GetNodeRequest};
use outpost::store::local::LocalStore;
use outpost::store::Durability;

use crate::delivery::assert_complete;
use crate::harness::{hex, outpost_bin, wait_for, AgentOptions, Solo};
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
    let mining = Arc::new(AtomicBool::new(true));
    let miner = {
        let (anvil, mining) = (anvil.clone(), mining.clone());
        tokio::spawn(async move {
            while mining.load(Ordering::SeqCst) {
                anvil.mine(1).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut taken = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        taken.push(snapshot_now(&agent.config));
    }
    mining.store(false, Ordering::SeqCst);
    miner.await.unwrap();

    // Retention keeps the newest two.
    assert_eq!(snap_files(&snap_dir), taken[1..].to_vec());
    let newest = taken.last().unwrap().clone();
    let (ok, text) = outpost(&["snapshot", "verify", newest.to_str().unwrap()]);
    assert!(ok && text.contains("valid agent snapshot"), "{text}");

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

    // Damage the stopped agent's store: sled opens it, but empty.
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
    // Every seq once, every height with anvil's hash, nothing taken as a duplicate.
    let n = assert_complete(&mut q, "node-1", &anvil).await;
    let d = q
        .get_node(GetNodeRequest {
            node_id: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.summary.unwrap().last_seq, n as u64);
    assert_eq!(d.duplicates_ignored, 0);
}
