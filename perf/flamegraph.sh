#!/usr/bin/env bash
# Profiles a skyferry-bench run with `perf record` and renders an SVG flamegraph (inferno).
#
#   perf/flamegraph.sh [-o OUT.svg] [-F HZ] -- <skyferry-bench arguments>
#   perf/flamegraph.sh -o unique.svg -- pipeline --mix unique --mem 1GiB
#
# Both ends of a `pipeline` run are children of the bench and are profiled with it; each
# pipeline thread has its own name (sf-scan, sf-encode-N, sf-send, sf-recv, sf-decode-N), so
# each is its own tower. Software clock events only (-e cpu-clock): this works in VMs that
# expose no hardware counters. The binary is built with the `profiling` profile (release
# code, full debug info) and frame pointers, into target/profiling.
set -euo pipefail
cd "$(dirname "$0")/.."

out=flamegraph.svg
freq=999
while [[ $# -gt 0 ]]; do
    case "$1" in
        -o) out="$2"; shift 2 ;;
        -F) freq="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "flamegraph.sh: unknown option $1 (put the bench's arguments after --)" >&2; exit 2 ;;
    esac
done
[[ $# -gt 0 ]] || { echo "flamegraph.sh: no skyferry-bench arguments given (try: -- pipeline --quick)" >&2; exit 2; }

command -v perf >/dev/null || { echo "flamegraph.sh: perf is missing (apt-get install linux-perf)" >&2; exit 1; }
if ! command -v inferno-flamegraph >/dev/null || ! command -v inferno-collapse-perf >/dev/null; then
    echo "flamegraph.sh: installing inferno (cargo install inferno --locked)" >&2
    cargo install inferno --locked
fi

RUSTFLAGS="${RUSTFLAGS:--C target-cpu=x86-64-v3} -C force-frame-pointers=yes" \
    cargo build --profile profiling -p skyferry-perf --bin skyferry-bench
bench=target/profiling/skyferry-bench

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
perf record -e cpu-clock -F "$freq" -g -o "$tmp/perf.data" -- "$bench" "$@"
perf script -i "$tmp/perf.data" 2>/dev/null | inferno-collapse-perf > "$tmp/folded"
inferno-flamegraph --title "skyferry-bench $*" --countname samples < "$tmp/folded" > "$out"
# The hottest frames, for a terminal: self samples per function.
echo "flamegraph: $out ($(wc -l < "$tmp/folded") distinct stacks)"
perf report -i "$tmp/perf.data" --no-children --sort comm,sym --stdio 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -25
