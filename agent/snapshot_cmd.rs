//! `outpost snapshot`: create, list, verify and restore store snapshots
//! from the command line.

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::SnapshotCommand;
use crate::config::{self, AnyConfig};
use crate::store::local::LocalStore;
use crate::store::snapshot::{self, Meta};
use crate::store::{open_db, Durability};

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { config, out } => {
            let w = create(&config, out.as_deref())?;
            println!(
                "wrote {} ({} bytes, sha256 {})",
                w.path.display(),
                w.bytes,
                w.sha256
            );
        }
        SnapshotCommand::List { dir } => {
            for (path, m) in snapshot::list(&dir)? {
                match m {
                    Ok(m) => println!(
                        "{}  {}  node {}  last seq {}  head {}",
                        path.display(),
                        m.store,
                        m.node_id.as_deref().unwrap_or("-"),
                        m.last_seq.map_or("-".into(), |s| s.to_string()),
                        m.head_height.map_or("-".into(), |h| h.to_string()),
                    ),
                    Err(e) => println!("{}  INVALID: {e}", path.display()),
                }
            }
        }
        SnapshotCommand::Verify { file } => {
            let bar = reading_bar(&file, "verifying");
            let (m, sha) = snapshot::verify_with(&file, &|n| bar.inc(n))?;
            bar.finish_and_clear();
            let entries: u64 = m.sections.iter().map(|s| s.entries).sum();
            println!(
                "{}: valid {} snapshot, {entries} entries in {} sections, sha256 {sha}",
                file.display(),
                m.store,
                m.sections.len()
            );
        }
        SnapshotCommand::Restore {
            file,
            data_dir,
            force,
        } => {
            let bar = reading_bar(&file, "restoring");
            let (m, aside) = snapshot::restore_with(&file, &data_dir, force, &|n| bar.inc(n))?;
            bar.finish_and_clear();
            if let Some(aside) = aside {
                println!("moved the previous store to {}", aside.display());
            }
            println!(
                "restored {} into {} (last seq {})",
                file.display(),
                data_dir.display(),
                m.last_seq.map_or("-".into(), |s| s.to_string())
            );
        }
    }
    Ok(())
}

/// A bar over the two reads of `file`, drawn on stderr only when it is a
/// terminal: a pipe, a log or a script sees nothing.
fn reading_bar(file: &Path, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(2 * len).with_message(what.to_string());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A spinner counting entries written, on a terminal only.
fn entries_spinner() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message("entries written");
    if let Ok(style) = ProgressStyle::with_template("{spinner} {pos} {msg}") {
        bar.set_style(style);
    }
    bar
}

fn create(config_path: &Path, out: Option<&Path>) -> anyhow::Result<snapshot::Written> {
    let in_use = |e: crate::store::StoreError| {
        if e.is_in_use() {
            anyhow::anyhow!(
                "{}: the store is in use by a running process; stop the service first",
                config_path.display()
            )
        } else {
            anyhow::Error::new(e)
        }
    };
    let written = match config::load_any(config_path)? {
        AnyConfig::Agent(cfg) => {
            let dir = cfg.snapshot_dir();
            let out = out.unwrap_or(&dir);
            let store = match LocalStore::open(
                &cfg.data_dir,
                4 << 20,
                Durability::ProcessCrash,
                u64::MAX,
            ) {
                Ok(s) => s,
                Err(e) if e.is_in_use() => return from_running_agent(&cfg, out),
                Err(e) => return Err(e.into()),
            };
            let meta = Meta {
                store: "agent".into(),
                node_id: Some(cfg.node_id.clone()),
                last_seq: Some(store.last_seq()),
                head_height: store.head()?.map(|h| h.height),
            };
            let bar = entries_spinner();
            let w = snapshot::create_with(store.db(), meta, out, &|n| bar.inc(n))?;
            bar.finish_and_clear();
            w
        }
        AnyConfig::Aggregator(cfg) => {
            let out =
                out.ok_or_else(|| anyhow::anyhow!("--out: required for an aggregator's store"))?;
            let db = open_db(&cfg.data_dir, 16 << 20).map_err(in_use)?;
            let meta = Meta {
                store: "aggregator".into(),
                node_id: None,
                last_seq: None,
                head_height: None,
            };
            let bar = entries_spinner();
            let w = snapshot::create_with(&db, meta, out, &|n| bar.inc(n))?;
            bar.finish_and_clear();
            w
        }
    };
    Ok(written)
}

/// The agent holds its store: it takes the snapshot itself, into its
/// snapshot dir, so it stays consistent with what it writes.
fn from_running_agent(cfg: &config::AgentConfig, out: &Path) -> anyhow::Result<snapshot::Written> {
    if out != cfg.snapshot_dir() {
        anyhow::bail!(
            "--out: the running agent writes snapshots into its snapshot dir {}; omit --out or stop the agent",
            cfg.snapshot_dir().display()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt
        .block_on(crate::node::admin::request_snapshot(&cfg.data_dir))
        .map_err(|e| anyhow::anyhow!("snapshot by the running agent: {e}"))?;
    let path = std::path::PathBuf::from(reply["file"].as_str().unwrap_or_default());
    let (manifest, sha256) = snapshot::verify(&path)?;
    Ok(snapshot::Written {
        bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
        path,
        sha256,
        manifest,
    })
}
