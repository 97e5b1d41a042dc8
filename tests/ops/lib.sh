# Shared by the ops tests: failing loudly, and the cached Debian root that
# both the package tests and the podman hosts start from.

OPS_CACHE=${OPS_CACHE:-/var/tmp/outpost-ops}

fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

pass() {
    printf 'ok (%ss): %s\n' "$SECONDS" "$*"
}

need() {
    command -v "$1" >/dev/null || fail "$1 is not installed; run bash tests/run.sh, which installs it"
}

# A minimal Debian bookworm with systemd, built once by debootstrap and kept
# in $OPS_CACHE/bookworm (about 75 s and 320 MB).
base_root() {
    local root=$OPS_CACHE/bookworm
    if [ ! -e "$root/.complete" ]; then
        need debootstrap
        rm -rf "$root"
        mkdir -p "$OPS_CACHE"
        debootstrap --variant=minbase \
            --include=python3,python3-apt,systemd,systemd-sysv,dbus,iproute2,procps \
            bookworm "$root" >"$OPS_CACHE/debootstrap.log" 2>&1 \
            || fail "debootstrap failed; see $OPS_CACHE/debootstrap.log"
        touch "$root/.complete"
    fi
    printf '%s\n' "$root"
}

# The one package file matching a glob, or fail.
one_file() {
    local matches=( $1 )
    [ "${#matches[@]}" -eq 1 ] && [ -e "${matches[0]}" ] || fail "expected one file matching $1, found: ${matches[*]}"
    printf '%s\n' "${matches[0]}"
}
