#!/usr/bin/env bash
# Builds and tears down a private multi-host lab out of Linux network namespaces.
#
# Topology for lab LAB (a name such as chorus-4242-partition):
#   LAB-br          holds bridge br0 (multicast snooping off, so groups flood like a dumb switch)
#   LAB-n<I>        one namespace per node: lo up, eth0 = 10.77.0.<I>/24 and fd77::<I>/64,
#                   the other end of eth0 is port v<I> of br0 inside LAB-br
# Nothing is created in, or changed in, the namespace this script is started from: every veth is
# created inside LAB-br and its peer moved straight into the node namespace, so no packet of the
# lab can reach a real network.
#
# Usage (as root):
#   lab.sh up LAB N          bridge plus nodes 1..N
#   lab.sh add LAB I         one more node namespace (late joiner, attacker, ...)
#   lab.sh down LAB          kill whatever still runs inside LAB-* and delete every LAB-* namespace
#   lab.sh clean-stale       delete chorus-<pid>-* namespaces whose <pid> is no longer running
#   lab.sh check             exit 0 if namespaces can be made here, else print why and exit 1
set -euo pipefail

die() { echo "lab.sh: $*" >&2; exit 1; }

lab_namespaces() { ip netns list | awk '{print $1}' | grep -E "^$1-(br|n[0-9]+)$" || true; }

down() {
    local lab=$1 ns pids
    for ns in $(lab_namespaces "$lab"); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -9 $pids 2>/dev/null || true
        fi
    done
    for ns in $(lab_namespaces "$lab"); do
        ip netns delete "$ns" 2>/dev/null || true
    done
}

add_node() {
    local lab=$1 i=$2
    local ns="$lab-n$i" br="$lab-br"
    [[ $i =~ ^[0-9]+$ ]] && [ "$i" -ge 1 ] && [ "$i" -le 250 ] || die "node index must be 1..250, got $i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.accept_dad=0
    ip -n "$br" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$br" link set "v$i" master br0
    ip -n "$br" link set "v$i" up
    ip -n "$ns" addr add "10.77.0.$i/24" brd 10.77.0.255 dev eth0
    ip -n "$ns" -6 addr add "fd77::$i/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
}

up() {
    local lab=$1 n=$2 i
    [[ $n =~ ^[0-9]+$ ]] || die "node count must be a number, got $n"
    [ -z "$(lab_namespaces "$lab")" ] || die "lab $lab already exists (lab.sh down $lab)"
    # Undo a half-built lab if any step fails.
    trap 'down "$lab"' ERR
    ip netns add "$lab-br"
    ip -n "$lab-br" link set lo up
    ip -n "$lab-br" link add br0 type bridge mcast_snooping 0
    ip -n "$lab-br" link set br0 up
    for i in $(seq 1 "$n"); do add_node "$lab" "$i"; done
    trap - ERR
}

# Start time of process $1 in seconds since the epoch (boot time + start ticks; the fields
# after the command name are counted from its closing parenthesis, the name may hold spaces).
process_start() {
    local ticks
    ticks=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}')
    [ -n "$ticks" ] || { echo 0; return; }
    echo $(($(awk '/^btime/ {print $2}' /proc/stat) + ticks / $(getconf CLK_TCK)))
}

clean_stale() {
    local ns pid
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^chorus-[0-9]+-' || true); do
        pid=${ns#chorus-}
        pid=${pid%%-*}
        # Stale when its creator is gone, or when that pid now belongs to a process started
        # after the namespace was made (pid reuse); 2 s of slack for clock rounding.
        if ! kill -0 "$pid" 2>/dev/null ||
            [ $(($(stat -c %Y "/run/netns/$ns") + 2)) -lt "$(process_start "$pid")" ]; then
            echo "lab.sh: removing stale namespace $ns (pid $pid is gone)" >&2
            down "${ns%-*}"
        fi
    done
}

check() {
    [ "$(id -u)" -eq 0 ] || { echo "not root (uid $(id -u))"; exit 1; }
    command -v ip >/dev/null || { echo "the ip command (iproute2) is missing"; exit 1; }
    command -v iptables >/dev/null || { echo "iptables is missing"; exit 1; }
    command -v python3 >/dev/null || { echo "python3 is missing"; exit 1; }
    local probe="chorus-$$-check-br"
    ip netns add "$probe" 2>/dev/null || { echo "ip netns add failed (no CAP_SYS_ADMIN?)"; exit 1; }
    local ok=1
    ip -n "$probe" link add br0 type bridge 2>/dev/null || ok=0
    ip -n "$probe" link add chk0 type veth peer name chk1 2>/dev/null || ok=0
    ip netns exec "$probe" iptables -L INPUT -n >/dev/null 2>&1 || ok=0
    ip netns delete "$probe"
    [ "$ok" -eq 1 ] || { echo "bridge, veth or iptables unusable inside a namespace"; exit 1; }
}

cmd=${1:-}
case "$cmd" in
    up) [ $# -eq 3 ] || die "usage: lab.sh up LAB N"; up "$2" "$3" ;;
    add) [ $# -eq 3 ] || die "usage: lab.sh add LAB I"; add_node "$2" "$3" ;;
    down) [ $# -eq 2 ] || die "usage: lab.sh down LAB"; down "$2" ;;
    clean-stale) clean_stale ;;
    check) check ;;
    *) die "usage: lab.sh up LAB N | add LAB I | down LAB | clean-stale | check" ;;
esac
