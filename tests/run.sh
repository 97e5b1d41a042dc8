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

log "system packages: libsystemd-dev (the systemd crate links it), prometheus and alertmanager (fleet tests), node exporter (Prometheus source tests), victoria-metrics (the shards' global view), systemd's journald (log tests)"
if ! pkg-config --exists libsystemd 2>/dev/null || [ ! -x /usr/bin/prometheus ] \
    || [ ! -x /usr/bin/prometheus-alertmanager ] || [ ! -x /usr/bin/prometheus-node-exporter ] \
    || [ ! -x /usr/bin/victoria-metrics ] || [ ! -x /lib/systemd/systemd-journald ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        libsystemd-dev pkg-config prometheus prometheus-alertmanager prometheus-node-exporter \
        victoria-metrics systemd util-linux >/dev/null
fi

log "ops tools: podman and runc (hosts with systemd), iptables (netavark's bridge network), debootstrap, lintian, rpm, iproute2 (network namespaces for the cut tests)"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v lintian >/dev/null || ! command -v rpm >/dev/null || ! command -v iptables >/dev/null \
    || ! command -v ip >/dev/null; then
    as_root apt-get update -qq
    # With podman's recommends: the tests run it as it is usually installed.
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq \
        podman runc debootstrap lintian rpm iproute2 netavark aardvark-dns iptables >/dev/null
fi

log "chromium, the headless browser of the fleet page test"
if [ ! -x /usr/bin/chromium ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null
fi

log "ansible-core and ansible-lint from PyPI, the containers.podman collection"
if ! command -v ansible-playbook >/dev/null || ! command -v ansible-lint >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check ansible-core==2.19.14 ansible-lint==26.10.1
fi
OPS_CACHE=${OPS_CACHE:-/var/tmp/outpost-ops}
COLLECTIONS=$OPS_CACHE/collections
if [ ! -e "$COLLECTIONS/ansible_collections/containers/podman/plugins/connection/podman.py" ]; then
    # The collection ships inside the ansible community package's wheel.
    mkdir -p "$OPS_CACHE/wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps ansible==12.3.0 -d "$OPS_CACHE/wheels"
    python3 - "$OPS_CACHE/wheels/ansible-12.3.0-py3-none-any.whl" "$COLLECTIONS" <<'PY'
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
wanted = [n for n in wheel.namelist() if n.startswith("ansible_collections/containers/podman/")]
wheel.extractall(sys.argv[2], wanted)
PY
fi

log "aiosmtpd from PyPI, the SMTP server the e-mail alert test sends to"
python3 -c "import aiosmtpd" 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check aiosmtpd==1.4.6

log "cargo-deb and cargo-generate-rpm"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@3.8.0
# A debug build installs in ~2.5 min instead of ~5 and costs ~35 s more
# when it writes the one .rpm.
command -v cargo-generate-rpm >/dev/null || cargo install --locked --quiet --debug cargo-generate-rpm@0.21.1

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

log "fuzz targets build (cargo test replays their seeds; the long runs are bash fuzz/run.sh SECONDS, in RELIABILITY.md)"
cargo check --locked --manifest-path fuzz/Cargo.toml --target-dir target

log "packages, systemd units, Ansible rollout on podman hosts"
bash tests/ops/run.sh
