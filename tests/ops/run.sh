#!/usr/bin/env bash
# The operator-facing tests: build the packages (revision 1, and 2 and 3 for
# upgrades), check them in Debian roots, lint the Ansible roles, then roll a
# fleet out on podman hosts with systemd. Called by tests/run.sh after the
# cargo tests; needs root and what tests/run.sh installs.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '\n== %s\n' "$*"; }

log "packages: release build, man pages, completions, .deb and .rpm"
bash tests/ops/build-packages.sh
for rev in 2 3; do
    cargo deb --no-build --no-strip --deb-revision "$rev" --output target/packages/ >/dev/null
done

log "packages: lintian, dpkg install/upgrade/remove/purge, rpm, systemd-analyze"
bash tests/ops/packages.sh

log "ansible-lint (production profile)"
(cd ansible && ANSIBLE_COLLECTIONS_PATH=${OPS_CACHE:-/var/tmp/outpost-ops}/collections ansible-lint --nocolor -q)

log "fleet rollout with Ansible on podman hosts running systemd"
bash tests/ops/fleet-hosts.sh
