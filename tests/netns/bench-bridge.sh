#!/usr/bin/env bash
# Throughput across a two-namespace bridge, with and without random loss at the receiver
# (issue 9, target 3). A measurement script, not a test: it prints a markdown table.
#
# Builds a private lab with lab.sh (bridge + nodes 1 and 2, see lab.sh), then for raw UDP
# multicast and for Chorus runs `chorus bench --role send` in node 1 (10.77.0.1) and
# `chorus bench --role receive` in node 2 (10.77.0.2), once without loss and once with an
# iptables rule in node 2 that drops a random share of the UDP datagrams arriving on eth0
# (`-m statistic --mode random --probability P`), RUNS times each (the four cases interleaved),
# and prints the medians, chorus(loss)/chorus(no loss) and chorus/raw. The lab is torn down on
# exit. All traffic stays inside the namespaces it creates (TTL 1, bridge in its own namespace).
#
# Usage (as root; otherwise it re-executes itself in a user+network+mount namespace of its own):
#   tests/netns/bench-bridge.sh [--runs 3] [--messages 200000] [--size 1400] [--loss 0.05]
#                               [--max-secs 30]
# The binary is $CHORUS_BIN, default target/release/chorus (cargo build --release -p chorus-cli).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
lab_sh="$here/lab.sh"

runs=3
messages=200000
size=1400
loss=0.05
max_secs=30
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --messages) messages=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --loss) loss=$2; shift 2 ;;
        --max-secs) max_secs=$2; shift 2 ;;
        *) echo "usage: $0 [--runs N] [--messages N] [--size B] [--loss P] [--max-secs S]" >&2; exit 2 ;;
    esac
done
for v in "$runs" "$messages" "$size" "$max_secs"; do
    [[ $v =~ ^[0-9]+$ ]] && [ "$v" -ge 1 ] || { echo "bench-bridge: not a positive number: $v" >&2; exit 2; }
done
[[ $loss =~ ^0(\.[0-9]+)?$ ]] || { echo "bench-bridge: --loss must be in 0..1, got $loss" >&2; exit 2; }
[ "$runs" -le 20 ] && [ "$messages" -le 5000000 ] && [ "$max_secs" -le 300 ] ||
    { echo "bench-bridge: at most 20 runs, 5000000 messages, 300 s per side" >&2; exit 2; }

# Without root: a user namespace where we are root, with its own network and mount namespaces
# (a private /run/netns), so lab.sh can make its namespaces there.
if [ "$(id -u)" -ne 0 ]; then
    [ -z "${BENCH_BRIDGE_UNSHARED:-}" ] || { echo "bench-bridge: still not root after unshare" >&2; exit 1; }
    command -v unshare >/dev/null || { echo "bench-bridge: needs root or unshare(1)" >&2; exit 1; }
    exec unshare --user --map-root-user --net --mount \
        env BENCH_BRIDGE_UNSHARED=1 "$0" --runs "$runs" --messages "$messages" --size "$size" \
        --loss "$loss" --max-secs "$max_secs"
fi
if [ -n "${BENCH_BRIDGE_UNSHARED:-}" ]; then
    [ -d /run/netns ] || mkdir -p /run/netns
    mount -t tmpfs bench-bridge /run/netns
fi

bin=${CHORUS_BIN:-$root/target/release/chorus}
[ -x "$bin" ] || { echo "bench-bridge: no chorus binary at $bin (cargo build --release -p chorus-cli, or set CHORUS_BIN)" >&2; exit 1; }
why=$("$lab_sh" check 2>&1) || { echo "bench-bridge: network namespaces unavailable: $why" >&2; exit 1; }

lab="chorus-$$-bench"
dir=$(mktemp -d "${TMPDIR:-/tmp}/bench-bridge.XXXXXX")
cleanup() {
    "$lab_sh" down "$lab" || true
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
"$lab_sh" clean-stale
"$lab_sh" up "$lab" 2
tx_ns="$lab-n1" rx_ns="$lab-n2"
tx_addr=10.77.0.1 rx_addr=10.77.0.2

# A side never runs longer than its own bounds (max-secs, 10 s to meet, idle); this is the
# backstop if it hangs anyway.
side_timeout=$((2 * max_secs + 40))

# field FILE KEY: the value of KEY in FILE's RESULT line.
field() { grep '^RESULT ' "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

set_loss() {
    ip netns exec "$rx_ns" iptables -F INPUT
    ip netns exec "$rx_ns" iptables -Z INPUT
    if [ "$1" != 0 ]; then
        ip netns exec "$rx_ns" iptables -A INPUT -i eth0 -p udp -m statistic --mode random \
            --probability "$1" -j DROP
    fi
}

# UDP datagrams the DROP rule of the receiver namespace dropped since set_loss.
kernel_drops() {
    ip netns exec "$rx_ns" iptables -L INPUT -v -x -n |
        awk '$3 == "DROP" { n += $1 } END { print n + 0 }'
}

# run_one TRANSPORT LOSS RUN: one measurement; appends a line to $dir/results.
run_one() {
    local transport=$1 p=$2 run=$3
    local tag="$transport-$p-$run" n
    n=$(wc -l <"$dir/results" 2>/dev/null || echo 0)
    # A fresh group, port and cluster per run: nothing of an earlier run can be counted.
    local group="239.255.78.$((n + 1)):$((17400 + n))" cluster="bench-$$-$n"
    local common=(bench --transport "$transport" --group "$group" --sizes "$size"
        --messages "$messages" --max-secs "$max_secs" --ttl 1 --cluster "$cluster")
    set_loss "$p"
    timeout "$side_timeout" ip netns exec "$rx_ns" "$bin" "${common[@]}" --role receive \
        --interface "$rx_addr" >"$dir/$tag.rx" 2>"$dir/$tag.rx.err" &
    local rx=$! waited=0
    until grep -q READY "$dir/$tag.rx.err" 2>/dev/null; do
        if ! kill -0 "$rx" 2>/dev/null || [ "$waited" -ge 200 ]; then
            echo "bench-bridge: the $tag receiver did not start:" >&2
            cat "$dir/$tag.rx.err" >&2
            exit 1
        fi
        sleep 0.05
        waited=$((waited + 1))
    done
    if ! timeout "$side_timeout" ip netns exec "$tx_ns" "$bin" "${common[@]}" --role send \
        --interface "$tx_addr" --receivers 1 >"$dir/$tag.tx" 2>"$dir/$tag.tx.err"; then
        echo "bench-bridge: the $tag sender failed:" >&2
        cat "$dir/$tag.tx.err" >&2
    fi
    wait "$rx" || echo "bench-bridge: the $tag receiver exited with $?" >&2
    grep -q '^RESULT ' "$dir/$tag.rx" || {
        echo "bench-bridge: no result from the $tag receiver:" >&2
        cat "$dir/$tag.rx.err" >&2
        exit 1
    }
    local sent received rate p50 p99 naks repairs drops unobserved stop
    sent=$(field "$dir/$tag.tx" sent)
    received=$(field "$dir/$tag.rx" received)
    rate=$(field "$dir/$tag.rx" msgs_per_sec)
    p50=$(field "$dir/$tag.rx" p50_us)
    p99=$(field "$dir/$tag.rx" p99_us)
    naks=$(field "$dir/$tag.rx" naks_sent)
    repairs=$(field "$dir/$tag.tx" repairs_sent)
    unobserved=$(field "$dir/$tag.rx" unobserved)
    stop=$(field "$dir/$tag.rx" stop)
    drops=$(kernel_drops)
    set_loss 0
    echo "$transport $p $run ${sent:-0} $received $rate $p50 $p99 ${naks:--} ${repairs:--} $drops ${unobserved:--}" \
        >>"$dir/results"
    printf '  %-6s loss %-4s run %d: %7s msgs/s, %s of %s delivered (%s unobserved, stop: %s), p50 %s us, p99 %s us, NAKs %s, repairs %s, iptables drops %s\n' \
        "$transport" "$p" "$run" "$rate" "$received" "${sent:-?}" "${unobserved:--}" "$stop" \
        "$p50" "$p99" "${naks:--}" "${repairs:--}" "$drops" >&2
}

echo "bench-bridge: lab $lab, $runs runs of $messages x $size B per case, loss $loss at $rx_addr; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
: >"$dir/results"
for run in $(seq 1 "$runs"); do
    for p in 0 "$loss"; do
        for transport in raw chorus; do
            run_one "$transport" "$p" "$run"
        done
    done
done

# median COLUMN TRANSPORT LOSS: the median of a results column over the runs of one case.
median() {
    awk -v c="$1" -v t="$2" -v p="$3" '$1 == t && $2 == p && $c != "-" { print $c }' "$dir/results" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) { print v[(NR + 1) / 2] } else { printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 } }'
}
all_rates() {
    awk -v t="$1" -v p="$2" '$1 == t && $2 == p { printf "%s%s", sep, $6; sep = ", " }' "$dir/results"
}
# Delivered share of a case: received/sent of its worst run, in percent.
delivered() {
    awk -v t="$1" -v p="$2" '$1 == t && $2 == p && $4 > 0 { printf "%.2f\n", 100 * $5 / $4 }' "$dir/results" |
        sort -g | head -n 1 | grep . || echo "-"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

pct=$(awk -v p="$loss" 'BEGIN { printf "%g %%", 100 * p }')
echo
echo "Two namespaces on one bridge (veth), 1 sender -> 1 receiver, $size B payloads, $messages messages per run, median of $runs runs:"
echo
echo "| transport | loss at receiver | msgs/s per receiver (median) | the runs | delivered (worst run) | p50 µs | p99 µs | NAKs | repairs | iptables drops | unobserved |"
echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
for transport in raw chorus; do
    for p in 0 "$loss"; do
        label=$([ "$p" = 0 ] && echo "none" || echo "$pct")
        echo "| $transport | $label | $(median 6 "$transport" "$p") | $(all_rates "$transport" "$p") | $(delivered "$transport" "$p") % | $(median 7 "$transport" "$p") | $(median 8 "$transport" "$p") | $(median 9 "$transport" "$p") | $(median 10 "$transport" "$p") | $(median 11 "$transport" "$p") | $(median 12 "$transport" "$p") |"
    done
done
raw0=$(median 6 raw 0) rawl=$(median 6 raw "$loss")
ch0=$(median 6 chorus 0) chl=$(median 6 chorus "$loss")
echo
echo "- chorus ($pct loss) / chorus (no loss) = $(ratio "$chl" "$ch0") (target 3: >= 0.8, every message delivered)"
echo "- chorus / raw, no loss = $(ratio "$ch0" "$raw0"); with $pct loss = $(ratio "$chl" "$rawl")"
echo "- raw UDP repairs nothing: its delivered share is what the bridge, the kernel and the loss rule let through."
echo "- unobserved: changes the Chorus receiver applied but its watch did not yield (it fell behind the"
echo "  node's change log and was restarted); counted as delivered, without latency."
