#!/usr/bin/env bash
# A rig of several hosts on one machine: network namespaces joined by a bridge.
#
#   scripts/netns_rig.sh up   [PREFIX [NET]]   create PREFIX-{client,a,b,etcd} on NET.0/24
#   scripts/netns_rig.sh down [PREFIX]         remove them
#   scripts/netns_rig.sh show [PREFIX]         list hosts and addresses
#
# PREFIX defaults to "rh", NET to "10.77.0". Hosts get NET.10 (client), NET.11 (a),
# NET.12 (b), NET.13 (etcd). The bridge lives in its own namespace PREFIX-lan, so the
# rig touches nothing of the machine's own network. Run a command on a host with
#   ip netns exec PREFIX-a remote-hw server --listen NET.11:7700 ...
set -euo pipefail
cmd=${1:-}
prefix=${2:-rh}
net=${3:-10.77.0}
hosts=(client a b etcd)
addr() { case $1 in client) echo "$net.10";; a) echo "$net.11";; b) echo "$net.12";; etcd) echo "$net.13";; esac; }

down() {
  for h in "${hosts[@]}" lan; do
    ip netns del "$prefix-$h" 2>/dev/null || true
  done
}

up() {
  down
  ip netns add "$prefix-lan"
  ip -n "$prefix-lan" link add br0 type bridge
  ip -n "$prefix-lan" link set br0 up
  ip -n "$prefix-lan" link set lo up
  local i=0
  for h in "${hosts[@]}"; do
    ns="$prefix-$h"
    ip netns add "$ns"
    # Interface names are at most 15 characters: a short stem of the prefix + index.
    # Inside the host the end is renamed eth0; the other end joins the bridge.
    local e="${prefix:0:10}${i}e" p="${prefix:0:10}${i}p"
    i=$((i + 1))
    ip link add "$e" type veth peer name "$p"
    ip link set "$e" netns "$ns" name eth0
    ip link set "$p" netns "$prefix-lan"
    ip -n "$prefix-lan" link set "$p" master br0 up
    ip -n "$ns" addr add "$(addr "$h")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

show() {
  for h in "${hosts[@]}"; do
    printf '%-8s %-16s %s\n' "$h" "$prefix-$h" "$(addr "$h")"
  done
}

case $cmd in
  up) up; show ;;
  down) down ;;
  show) show ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
