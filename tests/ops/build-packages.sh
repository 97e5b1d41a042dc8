#!/usr/bin/env bash
# Builds the release binary, its man pages and completions, and the .deb and
# .rpm into target/packages/. Extra arguments go to cargo deb (for example
# --deb-revision 2 for an upgrade test).
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --locked
rm -rf target/package-assets
target/release/outpost package-assets --out target/package-assets >/dev/null
rm -rf target/packages && mkdir -p target/packages
cargo deb --no-build --no-strip --output target/packages/ "$@"
cargo generate-rpm --output target/packages/
ls -1 target/packages/
