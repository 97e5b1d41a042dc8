#!/usr/bin/env bash
# Runs every Outpost test on a fresh Debian machine with Rust, Python and Node:
# installs what the tests need, then checks formatting, lints and runs the
# unit and integration tests. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

log "system packages: libsystemd-dev (the systemd crate links it), prometheus and alertmanager (fleet tests), systemd's journald (log tests)"
if ! pkg-config --exists libsystemd 2>/dev/null || [ ! -x /usr/bin/prometheus ] \
    || [ ! -x /usr/bin/prometheus-alertmanager ] || [ ! -x /lib/systemd/systemd-journald ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        libsystemd-dev pkg-config prometheus prometheus-alertmanager systemd util-linux >/dev/null
fi

log "anvil, a real Ethereum node for the integration tests"
ANVIL=node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
if [ ! -x "$ANVIL" ]; then
    npm install --no-save --no-audit --no-fund --loglevel=error @foundry-rs/anvil@1.7.1
fi
"$ANVIL" --version | head -1

log "format and lints"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

log "unit and integration tests"
# Benches are load generators (run by hand, see BENCHMARKS.md); clippy above
# already compiled them.
cargo test --locked
