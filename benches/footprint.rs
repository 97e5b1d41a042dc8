//! The agent's footprint beside Debian's `prometheus-node-exporter`, in one
//! run on one machine: an agent (the release binary, shipped defaults: 1 s
//! poll, host probe every 15 s, level `standard`) watching a real anvil that
//! mines a block every second and reporting to an aggregator, and a
//! node_exporter scraped every 15 s as Prometheus would. After a warm-up,
//! each process's CPU time (utime + stime from /proc) over the window and
//! its resident memory (largest VmRSS sampled every 5 s, VmHWM, and at the
//! end the split of VmRSS into the process's own memory, RssAnon, and the
//! pages of its binary and libraries mapped from the page cache, RssFile).
//!
//! Run: `cargo bench --bench footprint` (OUTPOST_FOOTPRINT_SECS sets the
//! window, default 120). Needs anvil and prometheus-node-exporter.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost::proto::GetNodeRequest;
use outpost::tls::Identity;

#[path = "../tests/it/harness.rs"]
mod harness;

use harness::{free_port, spawn_agent, Aggregator, Anvil, World};

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const WARMUP: Duration = Duration::from_secs(20);

struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// utime + stime in seconds.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .unwrap_or_else(|e| panic!("{} is gone: {e}", self.name));
        // Fields after the command's closing parenthesis; utime and stime
        // are the 14th and 15th of the whole line.
        let rest = &stat[stat.rfind(')').expect("stat line") + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|x| x.parse().expect("a tick count"))
            .collect();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f[0] + f[1]) as f64 / hz
    }

    /// Each living thread's name (digits at the end dropped, so that a
    /// pool's threads sum up), its time on a CPU in ns, and its runs.
    fn threads(&self) -> std::collections::BTreeMap<(String, u32), (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        let tasks = format!("/proc/{}/task", self.child.id());
        for t in std::fs::read_dir(tasks).expect("task list").flatten() {
            let tid: u32 = t.file_name().to_string_lossy().parse().unwrap_or(0);
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit());
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            let f: Vec<u64> = stat
                .split(' ')
                .filter_map(|x| x.trim().parse().ok())
                .collect();
            if f.len() == 3 {
                out.insert((name.trim_end_matches('-').to_string(), tid), (f[0], f[2]));
            }
        }
        out
    }

    /// A `/proc/<pid>/status` figure in KiB.
    fn kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_else(|e| panic!("{} is gone: {e}", self.name));
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} for {}", self.name))
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let secs: u64 = std::env::var("OUTPOST_FOOTPRINT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    assert!(
        Path::new(NODE_EXPORTER).exists(),
        "{NODE_EXPORTER} is missing: apt-get install prometheus-node-exporter (tests/run.sh does)"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let world = World::new();
        let anvil = Anvil::start(&world, "anvil").await;
        anvil.rpc("evm_setIntervalMining", serde_json::json!([1])).await;
        let agg = Aggregator::start(&world).await;
        world.issue(&Identity::Agent("node-1".into()));
        let pki = world.pki();
        let config = world.path().join("agent.toml");
        // Only what an operator must write; everything else at its default.
        std::fs::write(
            &config,
            format!(
                "node_id = \"node-1\"\nnetwork = \"devnet\"\ndata_dir = \"{}\"\n\
                 [source]\nkind = \"ethereum\"\nurl = \"{}\"\n\
                 [report]\naggregator = \"https://127.0.0.1:{}\"\nserver_name = \"localhost\"\n\
                 ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                world.path().join("agent-data").display(),
                anvil.url(),
                agg.port,
                pki.ca_cert().display(),
                pki.cert("agent-node-1").display(),
                pki.key("agent-node-1").display(),
            ),
        )
        .unwrap();
        let agent = Proc {
            name: "outpost agent",
            child: spawn_agent(&config, &world.path().join("agent.log")),
        };
        let exporter_port = free_port();
        let exporter = Proc {
            name: "node_exporter",
            child: Command::new(NODE_EXPORTER)
                .arg(format!("--web.listen-address=127.0.0.1:{exporter_port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("node_exporter starts"),
        };
        let scrape = format!("http://127.0.0.1:{exporter_port}/metrics");
        let scraper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tick.tick().await;
                if let Ok(r) = reqwest::get(&scrape).await {
                    let _ = r.bytes().await;
                }
            }
        });

        tokio::time::sleep(WARMUP).await;
        let mut q = world.query(&agg).await;
        let height = |n: outpost::proto::NodeDetail| {
            n.summary
                .and_then(|s| s.head)
                .map(|h| h.height)
                .unwrap_or(0)
        };
        let before = height(
            q.get_node(GetNodeRequest {
                node_id: "node-1".into(),
            })
            .await
            .expect("the aggregator knows node-1")
            .into_inner(),
        );
        let procs = [&agent, &exporter];
        let cpu0: Vec<f64> = procs.iter().map(|p| p.cpu()).collect();
        let threads0 = agent.threads();
        let started = Instant::now();
        let mut rss = [0u64; 2];
        while started.elapsed() < Duration::from_secs(secs) {
            for (i, p) in procs.iter().enumerate() {
                rss[i] = rss[i].max(p.kib("VmRSS:"));
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let took = started.elapsed().as_secs_f64();
        let cpu: Vec<f64> = procs
            .iter()
            .zip(&cpu0)
            .map(|(p, c0)| (p.cpu() - c0) / took * 100.0)
            .collect();
        let threads1 = agent.threads();
        let hwm: Vec<u64> = procs.iter().map(|p| p.kib("VmHWM:")).collect();
        let anon: Vec<u64> = procs.iter().map(|p| p.kib("RssAnon:")).collect();
        let file: Vec<u64> = procs.iter().map(|p| p.kib("RssFile:")).collect();
        let after = height(
            q.get_node(GetNodeRequest {
                node_id: "node-1".into(),
            })
            .await
            .unwrap()
            .into_inner(),
        );
        scraper.abort();
        assert!(
            after >= before + secs / 2,
            "the agent kept reporting: head {before} → {after} over {secs} s"
        );

        println!("window {took:.0} s; the agent reported heads {before} → {after}");
        println!(
            "| process | RSS, MiB (largest sample) | peak RSS (VmHWM), MiB | own (RssAnon), MiB | mapped files (RssFile), MiB | CPU, % of a core |"
        );
        println!("|---|---|---|---|---|---|");
        for (i, p) in procs.iter().enumerate() {
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
                p.name,
                mib(rss[i]),
                mib(hwm[i]),
                mib(anon[i]),
                mib(file[i]),
                cpu[i]
            );
        }
        let ratio = |v: &[u64]| v[0] as f64 / v[1] as f64;
        println!(
            "| agent / node_exporter | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            ratio(&rss),
            ratio(&hwm),
            ratio(&anon),
            ratio(&file),
            cpu[0] / cpu[1]
        );
        // Threads that lived through the window, summed by name.
        let mut by_name: std::collections::BTreeMap<&str, (u32, u64, u64)> = Default::default();
        for ((name, tid), (ns1, runs1)) in &threads1 {
            if let Some((ns0, runs0)) = threads0.get(&(name.clone(), *tid)) {
                let e = by_name.entry(name.as_str()).or_default();
                e.0 += 1;
                e.1 += ns1 - ns0;
                e.2 += runs1 - runs0;
            }
        }
        println!("\nthe agent's CPU by thread:\n");
        println!("| thread | how many | CPU, µs a second | runs a second | µs a run |");
        println!("|---|---|---|---|---|");
        for (name, (n, ns, runs)) in by_name {
            println!(
                "| {name} | {n} | {:.0} | {:.1} | {:.1} |",
                ns as f64 / 1000.0 / took,
                runs as f64 / took,
                ns as f64 / 1000.0 / runs.max(1) as f64
            );
        }
        drop(anvil);
    });
}
