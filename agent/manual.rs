//! Man pages and shell completions, generated from the clap definitions so
//! they cannot drift from the CLI. The packages ship what this writes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `man/outpost*.1` and `completions/` (bash, zsh, fish) under `out`.
/// Returns the files written.
pub fn write_package_assets(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "outpost", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    let mut written = Vec::new();
    for dir in [&man, &completions] {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            written.push(entry?.path());
        }
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_page_per_visible_command_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_package_assets(dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "outpost.1",
            "outpost-agent.1",
            "outpost-aggregator.1",
            "outpost-query-fleet.1",
            "outpost.bash",
            "_outpost",
            "outpost.fish",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("package-assets")),
            "the hidden command got a page: {names:?}"
        );
        let agent = std::fs::read_to_string(dir.path().join("man/outpost-agent.1")).unwrap();
        assert!(agent.contains("/etc/outpost/agent.toml"), "{agent}");
    }
}
