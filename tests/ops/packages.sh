#!/usr/bin/env bash
# The packages as operators meet them: lintian, dpkg install / upgrade /
# remove / purge in a real Debian root, the rpm inspected and installed into
# a root, and both units verified and scored by systemd-analyze.
# Expects target/packages/ from build-packages.sh (the V1 .deb, the .rpm and
# an upgrade .deb built with --deb-revision 2). Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/ops/lib.sh

need lintian
need rpm
need systemd-analyze

DEB1=$(one_file "target/packages/outpost_*-1_amd64.deb")
DEB2=$(one_file "target/packages/outpost_*-2_amd64.deb")
RPM=$(one_file "target/packages/outpost-*.x86_64.rpm")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/outpost-packages.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- lintian ---------------------------------------------------------------
if ! lintian --fail-on error,warning --suppress-tags-from-file /dev/null "$DEB1" >"$WORK/lintian.txt" 2>&1; then
    cat "$WORK/lintian.txt" >&2
    fail "lintian reports errors or warnings on $DEB1"
fi
pass "lintian: no errors or warnings"

# --- dpkg: install ---------------------------------------------------------
R=$WORK/deb-root
cp -a "$(base_root)" "$R"
cp "$DEB1" "$DEB2" "$R/tmp/"
in_root() { chroot "$R" "$@"; }

in_root dpkg -i "/tmp/$(basename "$DEB1")" </dev/null >"$WORK/dpkg1.txt" 2>&1 \
    || { cat "$WORK/dpkg1.txt" >&2; fail "dpkg -i $DEB1"; }
in_root /usr/bin/outpost --version | grep -q '^outpost ' || fail "outpost --version in the root"
for f in /usr/lib/systemd/system/outpost-agent.service /usr/lib/systemd/system/outpost-aggregator.service \
         /etc/outpost/agent.toml /etc/outpost/aggregator.toml /usr/share/man/man1/outpost.1.gz \
         /usr/share/man/man1/outpost-agent.1.gz /usr/share/bash-completion/completions/outpost \
         /usr/share/zsh/vendor-completions/_outpost /usr/share/fish/vendor_completions.d/outpost.fish \
         /usr/share/outpost/grafana/outpost-fleet.json /usr/share/outpost/prometheus/outpost-rules.yml; do
    [ -e "$R$f" ] || fail "$f is not installed"
done
in_root getent passwd outpost | grep -q ':/var/lib/outpost:/usr/sbin/nologin$' \
    || fail "user outpost missing or wrong: $(in_root getent passwd outpost)"
in_root getent group outpost >/dev/null || fail "group outpost missing"
[ "$(in_root stat -c '%U:%G %a' /var/lib/outpost)" = "outpost:outpost 750" ] \
    || fail "/var/lib/outpost is $(in_root stat -c '%U:%G %a' /var/lib/outpost)"
[ "$(in_root stat -c '%U:%G %a' /etc/outpost/pki)" = "root:outpost 750" ] \
    || fail "/etc/outpost/pki is $(in_root stat -c '%U:%G %a' /etc/outpost/pki)"
conffiles=$(in_root dpkg-query -W -f='${Conffiles}' outpost)
for f in /etc/outpost/agent.toml /etc/outpost/aggregator.toml; do
    grep -q " $f " <<<"$conffiles" || fail "$f is not a conffile: $conffiles"
done
if ls "$R"/etc/systemd/system/*.wants/outpost-* >/dev/null 2>&1; then
    fail "a unit was enabled at install, before any config exists"
fi
pass "dpkg -i: binary, units (not enabled), conffiles, man pages, completions, dashboard and rule pack, user and dirs"

# --- systemd-analyze ---------------------------------------------------------
# --man=no: verify looks Documentation= pages up in the host's man database,
# not the root's; the pages' presence in the root is checked above.
for unit in outpost-agent.service outpost-aggregator.service; do
    if ! systemd-analyze verify --man=no --root="$R" "$unit" >"$WORK/verify.out" 2>"$WORK/verify.err" \
        || [ -s "$WORK/verify.err" ]; then
        cat "$WORK/verify.out" "$WORK/verify.err" >&2
        fail "systemd-analyze verify $unit printed warnings or failed"
    fi
    score=$(systemd-analyze security --offline=true "$R/usr/lib/systemd/system/$unit" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')
    [ -n "$score" ] || fail "no exposure score for $unit"
    awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || fail "$unit exposure $score is above the goal of 2.0"
    pass "systemd-analyze: $unit verifies cleanly, exposure $score (goal <= 2.0)"
done

# --- dpkg: upgrade keeps a locally edited conffile and the data ---------------
echo '# edited by the operator' >>"$R/etc/outpost/agent.toml"
mkdir -p "$R/var/lib/outpost/agent"
echo data >"$R/var/lib/outpost/agent/marker"
in_root dpkg -i "/tmp/$(basename "$DEB2")" </dev/null >"$WORK/dpkg2.txt" 2>&1 \
    || { cat "$WORK/dpkg2.txt" >&2; fail "dpkg -i $DEB2 (upgrade)"; }
[ "$(in_root dpkg-query -W -f='${Version}' outpost)" = "$(dpkg-deb -f "$DEB2" Version)" ] \
    || fail "upgrade did not install $(dpkg-deb -f "$DEB2" Version)"
tail -n 1 "$R/etc/outpost/agent.toml" | grep -q 'edited by the operator' || fail "upgrade lost the local conffile edit"
[ -e "$R/var/lib/outpost/agent/marker" ] || fail "upgrade lost data in /var/lib/outpost"
pass "upgrade to $(dpkg-deb -f "$DEB2" Version): local config edit and data kept"

# --- dpkg: remove keeps configs and data, purge removes them and the user ----
in_root dpkg -r outpost >"$WORK/dpkg3.txt" 2>&1 || { cat "$WORK/dpkg3.txt" >&2; fail "dpkg -r"; }
[ ! -e "$R/usr/bin/outpost" ] || fail "dpkg -r left /usr/bin/outpost"
[ -e "$R/etc/outpost/agent.toml" ] || fail "dpkg -r removed the config"
[ -e "$R/var/lib/outpost/agent/marker" ] || fail "dpkg -r removed data"
in_root getent passwd outpost >/dev/null || fail "dpkg -r removed the user"
pass "dpkg -r: binary gone; config, data and user kept"

in_root dpkg -P outpost >"$WORK/dpkg4.txt" 2>&1 || { cat "$WORK/dpkg4.txt" >&2; fail "dpkg -P"; }
for d in /etc/outpost /var/lib/outpost; do
    [ ! -e "$R$d" ] || fail "dpkg -P left $d"
done
! in_root getent passwd outpost >/dev/null || fail "dpkg -P left the user"
! in_root getent group outpost >/dev/null || fail "dpkg -P left the group"
pass "dpkg -P: configs, data, user and group removed"

# --- rpm ---------------------------------------------------------------------
rpm -qpi "$RPM" >"$WORK/rpm-info.txt" 2>/dev/null
grep -q '^Name *: outpost' "$WORK/rpm-info.txt" || { cat "$WORK/rpm-info.txt" >&2; fail "rpm -qpi: no name"; }
listing=$(rpm -qpl "$RPM" 2>/dev/null)
for f in /usr/bin/outpost /usr/lib/systemd/system/outpost-agent.service \
         /usr/lib/systemd/system/outpost-aggregator.service /etc/outpost/agent.toml \
         /usr/share/man/man1/outpost.1 /usr/share/bash-completion/completions/outpost \
         /usr/share/outpost/prometheus/outpost-rules.yml; do
    grep -qx "$f" <<<"$listing" || fail "rpm -qpl: $f missing"
done
configs=$(rpm -qpc "$RPM" 2>/dev/null)
[ "$configs" = "$(printf '/etc/outpost/agent.toml\n/etc/outpost/aggregator.toml')" ] \
    || fail "rpm -qpc: $configs"
rpm -qp --queryformat '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" 2>/dev/null \
    | grep -q '^cn /etc/outpost/agent.toml$' || fail "agent.toml is not %config(noreplace)"
rpm -qp --scripts "$RPM" 2>/dev/null | grep -q 'useradd --system' || fail "rpm --scripts: no user creation"

R2=$WORK/rpm-root
cp -a "$(base_root)" "$R2"
rpm --root "$R2" --initdb
rpm --root "$R2" -ivh --nodeps "$RPM" >"$WORK/rpm-install.txt" 2>&1 \
    || { cat "$WORK/rpm-install.txt" >&2; fail "rpm -ivh into a root"; }
[ -x "$R2/usr/bin/outpost" ] || fail "rpm install: no /usr/bin/outpost"
chroot "$R2" getent passwd outpost >/dev/null || fail "rpm install: no user outpost"
[ "$(chroot "$R2" stat -c '%U %a' /var/lib/outpost)" = "outpost 750" ] || fail "rpm install: /var/lib/outpost"
rpm --root "$R2" -V --nodeps outpost >"$WORK/rpm-verify.txt" 2>&1 || { cat "$WORK/rpm-verify.txt" >&2; fail "rpm -V"; }
pass "rpm: -qpi/-qpl/-qpc/--scripts as expected; installs into a root and verifies"
