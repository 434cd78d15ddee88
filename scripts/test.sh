#!/usr/bin/env bash
# The README's test command: installs what it needs, then builds and runs every test of paqet-dp.
# Run as root (the data-path tests build their own network namespaces; without root they skip).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

scripts/setup.sh
export PATH="$(cat "${TMPDIR:-/tmp}/paqet-dp-bpf-linker-path"):$PATH"
# In CI a build without the XDP program is an error, not a skip.
if [ -n "${CI:-}" ]; then export PAQET_REQUIRE_XDP=1; fi

# Namespaces left by an earlier run that was killed (our tests name theirs pq<pid>...).
if [ "$(id -u)" = 0 ]; then
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^pq[0-9]' | xargs -r -n1 ip netns del || true
fi

echo "== cargo fmt --check, cargo clippy -D warnings (workspace, the eBPF crate and the fuzz crate)"
cargo fmt --all -- --check
(cd paqet-ebpf && cargo fmt -- --check)
(cd paqet-userspace/fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings

# Release binaries (amd64, arm64), the OCI images and the .debs: tests/shipping.rs checks them.
echo "== shipping artifacts (scripts/ship.sh; log: target/ship.log)"
mkdir -p target
if ! scripts/ship.sh >target/ship.log 2>&1; then
    tail -n 40 target/ship.log
    echo "scripts/ship.sh failed (full log: target/ship.log)" >&2
    exit 1
fi
grep -E '^(ship|image):' target/ship.log

echo "== cargo test (workspace)"
cargo test --workspace --locked

echo "== fuzz: every decoder for a bounded time"
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
(
    cd paqet-userspace/fuzz
    # The fuzz targets exercise the protocol decoders only: skip building the XDP object here.
    export PAQET_NO_EBPF=1
    for t in $(cargo +nightly fuzz list); do
        echo "-- fuzz $t (${FUZZ_SECONDS}s)"
        cargo +nightly fuzz run "$t" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=10 \
            -malloc_limit_mb=512 -print_final_stats=0 2>&1 | tail -n 3
    done
)
echo "fuzz: all targets ran without a crash"
