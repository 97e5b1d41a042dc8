//! A data directory that fills up: a small tmpfs under the agent's store.

use std::process::Command;
use std::time::Duration;

use crate::delivery::{assert_complete, rounds};
use crate::harness::{Agent, AgentOptions, Aggregator, Anvil, World};
use crate::spine::wait_at_head;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
pub struct Tmpfs {
    pub dir: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts it at `path` (made if missing).
    pub fn at(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount runs (util-linux; tests/run.sh installs it)");
        assert!(
            out.status.success(),
            "mount tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: path.to_path_buf(),
        }
    }

    /// Fills the filesystem but for about `leave` bytes; returns the filler.
    pub fn fill(&self, leave: u64) -> std::path::PathBuf {
        let stat = nix_free(&self.dir);
        let filler = self.dir.join("filler");
        let size = stat.saturating_sub(leave);
        let f = std::fs::File::create(&filler).unwrap();
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        let chunk = vec![0u8; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if w.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = w.flush();
        filler
    }
}

/// Free bytes on the filesystem holding `path` (from `df`).
fn nix_free(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test]
async fn an_agent_whose_disk_fills_up_stays_up_and_loses_nothing_committed() {
    use outpost::proto::{FindingKind, FindingState};
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let mut agg = Aggregator::start(&world).await;
    let tmpfs = Tmpfs::at(&world.path().join("node-1-data"), "32m");
    let agent = Agent::start(
        &world,
        "node-1",
        &anvil.url(),
        &agg,
        AgentOptions {
            block_time: "600s",
            extra_tables: "[store]\nmin_free_bytes = 4194304",
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    anvil.mine(5).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    for round in 0..rounds("OUTPOST_SOAK_DISK_FULL", 1) {
        // The aggregator goes away too, so nothing drains the outbox.
        agg.kill9();
        let filler = tmpfs.fill(1 << 20);
        for _ in 0..10 {
            anvil.mine(10).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(&agent.log).unwrap();
        assert!(
            log.contains("the store is not written until there are"),
            "round {round}: {log}"
        );
        std::fs::remove_file(&filler).unwrap();
        agg.restart(&world).await;
        q = world.query(&agg).await;
        wait_at_head(&mut q, &anvil, &agent, &agg).await;
        let logs = [agent.log.as_path(), agg.log.as_path()];
        let f = crate::spine::wait_finding(
            &q,
            "node-1",
            FindingKind::StorePaused,
            FindingState::Occurred,
            &logs,
        )
        .await;
        assert!(f.summary.contains("bytes were free"), "{}", f.summary);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_complete(&mut q, "node-1", &anvil).await;
    }
    let mut agent = agent;
    assert!(agent.running(), "the agent stayed up");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        !log.contains("No space left on device"),
        "sled never met a full disk"
    );
}

#[tokio::test]
async fn an_aggregator_whose_disk_fills_up_stops_taking_batches_and_agents_keep_them() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    // The default store.min_free_bytes is 64 MiB.
    let tmpfs = Tmpfs::at(&world.path().join("aggregator-data"), "128m");
    let mut agg = Aggregator::start(&world).await;
    let agent = Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    anvil.mine(5).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let filler = tmpfs.fill(32 << 20);
    for _ in 0..10 {
        anvil.mine(10).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = [agent.log.as_path(), agg.log.as_path()];
    crate::harness::wait_for(
        "the aggregator to refuse",
        Duration::from_secs(20),
        &logs,
        || async {
            let log = std::fs::read_to_string(&agg.log).unwrap_or_default();
            log.contains("refused a batch: the store's disk is nearly full")
                .then_some(())
        },
    )
    .await;
    let stored = crate::spine::node(&mut q, "node-1").await.unwrap();
    assert!(
        stored.head.unwrap().height < anvil.head().await,
        "nothing taken in while full"
    );
    std::fs::remove_file(&filler).unwrap();
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_complete(&mut q, "node-1", &anvil).await;
    let log = std::fs::read_to_string(&agg.log).unwrap();
    assert!(
        !log.contains("No space left on device"),
        "sled never met a full disk"
    );
    agg.kill9();
}
