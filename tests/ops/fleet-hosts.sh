#!/usr/bin/env bash
# A fleet on real hosts: podman containers with systemd as PID 1, built from
# the cached Debian root. Two run an aggregator each, a shard by network:
# outpost-agg serves devnet, outpost-agg2 serves devnet-b. Three run an anvil
# node and an agent, two in devnet and one in devnet-b. ansible/site.yml
# installs the .deb, places certificates and starts the units, each agent
# reporting to its network's shard; then the test checks the fleet through
# each aggregator and through one query of both,
# journald, a second run (changed=0), a serial upgrade through the health
# gate, systemctl reload of a threshold, a rollout stopped by an unhealthy host, and a bad
# config refused before it lands.
# Expects target/packages/ from build-packages.sh with revisions 1, 2 and 3
# of the .deb. Needs root, podman and runc.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT_DIR=$PWD
. tests/ops/lib.sh

need podman
need runc
need ansible-playbook
ANVIL=${OUTPOST_ANVIL:-$ROOT_DIR/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil}
[ -x "$ANVIL" ] || fail "anvil not found at $ANVIL; run bash tests/run.sh, which installs it"
export ANSIBLE_COLLECTIONS_PATH=$OPS_CACHE/collections
[ -e "$ANSIBLE_COLLECTIONS_PATH/ansible_collections/containers/podman/plugins/connection/podman.py" ] \
    || fail "the containers.podman collection is missing from $ANSIBLE_COLLECTIONS_PATH; run bash tests/run.sh"
export ANSIBLE_CONFIG=$ROOT_DIR/ansible/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0

DEB1=$(one_file "$ROOT_DIR/target/packages/outpost_*-1_amd64.deb")
DEB2=$(one_file "$ROOT_DIR/target/packages/outpost_*-2_amd64.deb")
DEB3=$(one_file "$ROOT_DIR/target/packages/outpost_*-3_amd64.deb")
OUTPOST=$ROOT_DIR/target/release/outpost
IMAGE=localhost/outpost-bookworm-systemd
AGG=outpost-agg
AGG2=outpost-agg2
NODES=(outpost-n1 outpost-n2 outpost-n3)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/outpost-hosts.XXXXXX")

# One at a time: podman rm given several names stops at the first it
# cannot find, leaving the rest (a half-created host from a failed run).
remove_hosts() {
    for h in "$AGG" "$AGG2" "${NODES[@]}"; do
        podman rm -f -t 0 "$h" >/dev/null 2>&1 || true
    done
}

cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        for h in "$AGG" "$AGG2" "${NODES[@]}"; do
            echo "--- journal of $h" >&2
            podman exec "$h" journalctl --no-pager -n 30 -u outpost-agent -u outpost-aggregator >&2 || true
        done
    fi
    # OUTPOST_KEEP_HOSTS=1 leaves the hosts running for a look after a failure.
    [ -n "${OUTPOST_KEEP_HOSTS:-}" ] || remove_hosts
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- hosts --------------------------------------------------------------------
if ! podman image exists "$IMAGE"; then
    tar -C "$(base_root)" --exclude=./.complete -cf "$WORK/root.tar" .
    podman import --change 'CMD ["/sbin/init"]' "$WORK/root.tar" "$IMAGE" >/dev/null
    rm -f "$WORK/root.tar"
fi
remove_hosts
for h in "$AGG" "$AGG2" "${NODES[@]}"; do
    podman run -d --runtime runc --ulimit nofile=10000:10000 --ulimit nproc=10000:10000 \
        --systemd=always --cap-add SYS_ADMIN --name "$h" --hostname "$h" "$IMAGE" /sbin/init >/dev/null
done
for h in "$AGG" "$AGG2" "${NODES[@]}"; do
    for _ in $(seq 1 50); do
        state=$(podman exec "$h" systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 0.2
    done
    case "$state" in running|degraded) ;; *) fail "$h: systemd did not come up ($state)" ;; esac
done
ip_of() { podman inspect -f '{{.NetworkSettings.IPAddress}}' "$1"; }
AGG_IP=$(ip_of "$AGG")
AGG2_IP=$(ip_of "$AGG2")
pass "5 hosts with systemd as PID 1; aggregators at $AGG_IP (devnet) and $AGG2_IP (devnet-b)"

start_anvil() {
    podman exec -d "$1" /usr/local/bin/anvil --host 0.0.0.0 --port 8545 --block-time 1 --silent
}
for h in "${NODES[@]}"; do
    podman cp "$ANVIL" "$h:/usr/local/bin/anvil"
    start_anvil "$h"
done

cat >"$WORK/inventory.yml" <<INV
all:
  vars:
    ansible_connection: containers.podman.podman
    ansible_python_interpreter: /usr/bin/python3
    # podman exec is root already; the hosts have no sudo.
    ansible_become: false
    outpost_control_binary: $OUTPOST
    outpost_pki_dir: $WORK/pki
    outpost_network_id: "31337"
    outpost_expected_block_time: 1s
  children:
    outpost_aggregators:
      vars:
        outpost_snapshot_interval: 5s
      children:
        outpost_shard_devnet:
          vars:
            outpost_fleet_networks: [devnet]
          hosts:
            $AGG:
              outpost_aggregator_url: "https://$AGG_IP:7443"
              outpost_aggregator_sans: ["$AGG_IP"]
              outpost_metrics_labels: {aggregator: $AGG}
        outpost_shard_devnet_b:
          vars:
            outpost_fleet_networks: [devnet-b]
          hosts:
            $AGG2:
              outpost_aggregator_url: "https://$AGG2_IP:7443"
              outpost_aggregator_sans: ["$AGG2_IP"]
              outpost_metrics_labels: {aggregator: $AGG2}
    outpost_agents:
      vars:
        outpost_network: devnet
      hosts:
        outpost-n1:
        outpost-n2:
        outpost-n3:
          outpost_network: devnet-b
INV

play() {
    local log=$1
    shift
    # One batch unless a run asks for serial 1 (serial is a play keyword, so it
    # comes from extra vars, not the inventory).
    ansible-playbook -i "$WORK/inventory.yml" "$ROOT_DIR/ansible/site.yml" -e outpost_serial=3 "$@" >"$WORK/$log" 2>&1
}
show() { tail -n 40 "$WORK/$1" >&2; }

# query_at ENDPOINTS ARGS...: a query of one aggregator or, with a comma
# list, of several merged; query: both shards.
query_at() {
    local endpoints=$1
    shift
    "$OUTPOST" query --endpoint "$endpoints" --ca "$WORK/pki/ca.pem" \
        --cert "$WORK/pki/operator-ansible.pem" --key "$WORK/pki/operator-ansible.key" --json "$@"
}
query() { query_at "https://$AGG_IP:7443,https://$AGG2_IP:7443" "$@"; }
pkg_version() { podman exec "$1" dpkg-query -W -f='${Version}' outpost; }
main_pid() { podman exec "$1" systemctl show -p MainPID --value outpost-agent; }
recap_changed() { sed -n 's/^\([^ ]*\) *: ok=[0-9]* *changed=\([0-9]*\).*/\1 \2/p' "$WORK/$1"; }

# --- first run ------------------------------------------------------------------
play run1.log -e "outpost_package_path=$DEB1" || { show run1.log; fail "first site.yml run failed"; }
for h in "${NODES[@]}"; do
    [ "$(podman exec "$h" systemctl is-active outpost-agent)" = active ] || fail "$h: outpost-agent is not active"
done
for h in "$AGG" "$AGG2"; do
    [ "$(podman exec "$h" systemctl is-active outpost-aggregator)" = active ] || fail "$h: outpost-aggregator is not active"
done
pass "site.yml: .deb installed, certs placed, units active on all hosts"

anvil_head() {
    python3 - "$(ip_of "$1")" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(f"http://{sys.argv[1]}:8545", data=json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}).encode(),
    headers={"content-type": "application/json"})
print(int(json.load(urllib.request.urlopen(req, timeout=5))["result"], 16))
PY
}
# The aggregator's view is read once, between two reads of every anvil: each
# node's reported head lies between its anvil's head a poll or two before the
# query and its head after it.
declare -A head_before head_after
for h in "${NODES[@]}"; do head_before[$h]=$(anvil_head "$h"); done
query nodes >"$WORK/nodes.json"
for h in "${NODES[@]}"; do head_after[$h]=$(anvil_head "$h"); done
for h in "${NODES[@]}"; do
    python3 - "$WORK/nodes.json" "$h" "${head_before[$h]}" "${head_after[$h]}" <<'PY' || fail "$h is not in query nodes with its node's head"
import json, sys
nodes = {n["node_id"]: n for n in json.load(open(sys.argv[1]))}
n, before, after = nodes.get(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
assert n and n["connected"] and n["status"] == "ok", n
# anvil mines a block a second; the aggregator may be a poll and a batch behind.
assert before - 5 <= n["head"]["height"] <= after, (n["head"], before, after)
print(f"ok: {sys.argv[2]} at the aggregator: head {n['head']['height']} (anvil {before}..{after}), {n['status']}")
PY
    entries=$(podman exec "$h" journalctl -u outpost-agent "NODE_ID=$h" -o json --no-pager | grep -c . || true)
    [ "$entries" -gt 0 ] || fail "$h: no journal entries with NODE_ID=$h"
done
pass "journald on each agent host has entries with its NODE_ID"

# Each shard holds its own network's nodes and no other: the agents were sent
# to the aggregators that serve their network.
query_at "https://$AGG_IP:7443" nodes >"$WORK/shard-a.json" || fail "query of $AGG failed"
query_at "https://$AGG2_IP:7443" nodes >"$WORK/shard-b.json" || fail "query of $AGG2 failed"
python3 - "$WORK/shard-a.json" "$WORK/shard-b.json" "$WORK/nodes.json" <<'PY' || fail "the shards do not hold their own networks' nodes"
import json, sys
a, b, merged = (json.load(open(p)) for p in sys.argv[1:4])
ids = lambda nodes: sorted(n["node_id"] for n in nodes)
assert ids(a) == ["outpost-n1", "outpost-n2"], ids(a)
assert ids(b) == ["outpost-n3"], ids(b)
assert ids(merged) == ["outpost-n1", "outpost-n2", "outpost-n3"], ids(merged)
assert {n["network"] for n in a} == {"devnet"} and {n["network"] for n in b} == {"devnet-b"}, (a, b)
print("ok: devnet on outpost-agg, devnet-b on outpost-agg2, all three in one query")
PY
for h in "$AGG" "$AGG2"; do
    podman exec "$h" grep -q "^aggregator = \"$h\"\$" /etc/outpost/aggregator.toml \
        || fail "$h: its metrics label is not in its config"
    podman exec "$h" python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9464/metrics").read().decode())' \
        | grep -q "aggregator=\"$h\"" \
        || fail "$h: its metrics do not carry aggregator=\"$h\""
done
pass "sharded by network: 2 nodes on $AGG, 1 on $AGG2, 3 in the merged query, metrics labelled by aggregator"

# --- second run changes nothing -----------------------------------------------------
play run2.log -e "outpost_package_path=$DEB1" || { show run2.log; fail "second site.yml run failed"; }
if recap_changed run2.log | awk '$2 != 0 { bad = 1 } END { exit !bad }'; then
    show run2.log
    fail "the second run changed something: $(recap_changed run2.log | tr '\n' ' ')"
fi
[ "$(recap_changed run2.log | wc -l)" -eq 5 ] || { show run2.log; fail "no PLAY RECAP for all 5 hosts"; }
pass "second run: changed=0 on all 5 hosts"

# --- serial upgrade through the health gate ------------------------------------------
declare -A before
for h in "${NODES[@]}"; do before[$h]=$(main_pid "$h"); done
play run3.log -e "outpost_package_path=$DEB2" -e outpost_serial=1 || { show run3.log; fail "upgrade rollout failed"; }
v2=$(dpkg-deb -f "$DEB2" Version)
for h in "${NODES[@]}"; do
    [ "$(pkg_version "$h")" = "$v2" ] || fail "$h runs $(pkg_version "$h"), not $v2"
    [ "$(main_pid "$h")" != "${before[$h]}" ] || fail "$h: the agent was not restarted by the upgrade"
done
[ "$(grep -c 'Wait until each aggregator reports' "$WORK/run3.log")" -eq 3 ] \
    || { show run3.log; fail "the health gate did not run once per batch"; }
pass "serial upgrade to $v2: 3 batches of 1, each through the health gate"

# --- systemctl reload applies a changed threshold live ----------------------------------
pid=$(main_pid outpost-n1)
podman exec outpost-n1 sed -i 's/^expected_block_time = "1s"$/expected_block_time = "2s"/' /etc/outpost/agent.toml
podman exec outpost-n1 systemctl reload outpost-agent
for _ in $(seq 1 50); do
    podman exec outpost-n1 journalctl -u outpost-agent --no-pager -o cat \
        | grep -q 'config reloaded: validate.expected_block_time: "1s" -> "2s"' && break
    sleep 0.2
done
podman exec outpost-n1 journalctl -u outpost-agent --no-pager -o cat \
    | grep -q 'config reloaded: validate.expected_block_time: "1s" -> "2s"' \
    || fail "reload: the changed threshold is not in the journal"
[ "$(podman exec outpost-n1 systemctl is-active outpost-agent)" = active ] || fail "reload stopped the agent"
[ "$(main_pid outpost-n1)" = "$pid" ] || fail "reload restarted the agent"
pass "systemctl reload: expected_block_time 1s -> 2s applied in the same process"

# --- a snapshot of the running agent, inside the unit's sandbox -----------------------
out=$(podman exec outpost-n1 outpost snapshot create --config /etc/outpost/agent.toml 2>&1) \
    || fail "snapshot of the running agent: $out"
snap=$(printf '%s\n' "$out" | sed -n 's/^wrote \([^ ]*\) .*/\1/p')
case "$snap" in /var/lib/outpost/agent-snapshots/*.snap) ;; *) fail "snapshot went to an unexpected place: $out" ;; esac
podman exec outpost-n1 outpost snapshot verify "$snap" >/dev/null || fail "the agent's snapshot does not verify"
[ "$(podman exec outpost-n1 stat -c %U "$snap")" = outpost ] || fail "the snapshot is not owned by outpost"
pass "snapshot create asked the running agent; it wrote $snap under its StateDirectory"

# --- a scheduled snapshot of the aggregator, inside the unit's sandbox -----------------
agg_snap=""
for _ in $(seq 1 30); do
    agg_snap=$(podman exec "$AGG" sh -c 'ls -1 /var/lib/outpost/aggregator-snapshots/*.snap 2>/dev/null | tail -1' || true)
    [ -n "$agg_snap" ] && break
    sleep 1
done
if [ -z "$agg_snap" ]; then
    podman exec "$AGG" journalctl --no-pager -n 20 -u outpost-aggregator >&2 || true
    fail "no scheduled aggregator snapshot in /var/lib/outpost/aggregator-snapshots"
fi
podman exec "$AGG" outpost snapshot verify "$agg_snap" >/dev/null || fail "the aggregator's snapshot does not verify"
[ "$(podman exec "$AGG" stat -c %U "$agg_snap")" = outpost ] || fail "the aggregator's snapshot is not owned by outpost"
if podman exec "$AGG" journalctl --no-pager -u outpost-aggregator | grep -q 'snapshot failed'; then
    fail "an aggregator snapshot failed under the shipped unit"
fi
pass "the aggregator's scheduled snapshot $agg_snap landed under its StateDirectory"

# --- an unhealthy host stops the rollout ------------------------------------------------
podman exec outpost-n2 pkill -x anvil
if play run4.log -e "outpost_package_path=$DEB3" -e outpost_serial=1 \
    -e outpost_health_retries=8 -e outpost_health_delay=2; then
    show run4.log
    fail "the rollout went on past a host whose node is down"
fi
grep -q "Health gate: the aggregator at https://$AGG_IP:7443 does not report outpost-n2 as connected and ok" "$WORK/run4.log" \
    || { show run4.log; fail "no health-gate message for outpost-n2"; }
v3=$(dpkg-deb -f "$DEB3" Version)
[ "$(pkg_version outpost-n1)" = "$v3" ] || fail "outpost-n1 (batch 1) was not upgraded"
[ "$(pkg_version outpost-n3)" = "$v2" ] || fail "outpost-n3 (after the failed batch) was touched: $(pkg_version outpost-n3)"
pass "rollout of $v3 stopped at outpost-n2 (node down); outpost-n3 still on $v2"

# --- a bad config is refused before it lands ----------------------------------------------
start_anvil outpost-n2
sed -i 's/^        outpost-n3:$/        outpost-n3:\n          outpost_source_poll_interval: 0s/' "$WORK/inventory.yml"
config_before=$(podman exec outpost-n3 sha256sum /etc/outpost/agent.toml)
if play run5.log -e "outpost_package_path=$DEB3"; then
    show run5.log
    fail "a config with poll_interval = 0s was accepted"
fi
grep -q 'source.poll_interval: must be greater than zero' "$WORK/run5.log" \
    || { show run5.log; fail "the refusal does not say what is wrong"; }
[ "$(podman exec outpost-n3 sha256sum /etc/outpost/agent.toml)" = "$config_before" ] \
    || fail "the refused config replaced the working one"
[ "$(podman exec outpost-n3 systemctl is-active outpost-agent)" = active ] || fail "outpost-n3 stopped"
pass "bad config on outpost-n3 refused by check-config; old config and agent kept"
