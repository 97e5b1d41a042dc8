//! `outpost snapshot`: create, list, verify and restore store snapshots
//! from the command line.

use std::path::Path;

use crate::cli::SnapshotCommand;
use crate::config::{self, AnyConfig};
use crate::store::local::LocalStore;
use crate::store::snapshot::{self, Meta};
use crate::store::{open_db, Durability};

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { config, out } => {
            let w = create(&config, &out)?;
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
            let (m, sha) = snapshot::verify(&file)?;
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
            let (m, aside) = snapshot::restore(&file, &data_dir, force)?;
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

fn create(config_path: &Path, out: &Path) -> anyhow::Result<snapshot::Written> {
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
            let store =
                LocalStore::open(&cfg.data_dir, 4 << 20, Durability::ProcessCrash, u64::MAX)
                    .map_err(in_use)?;
            let meta = Meta {
                store: "agent".into(),
                node_id: Some(cfg.node_id.clone()),
                last_seq: Some(store.last_seq()),
                head_height: store.head()?.map(|h| h.height),
            };
            snapshot::create(store.db(), meta, out)?
        }
        AnyConfig::Aggregator(cfg) => {
            let db = open_db(&cfg.data_dir, 16 << 20).map_err(in_use)?;
            let meta = Meta {
                store: "aggregator".into(),
                node_id: None,
                last_seq: None,
                head_height: None,
            };
            snapshot::create(&db, meta, out)?
        }
    };
    Ok(written)
}
