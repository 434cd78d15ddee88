#!/usr/bin/env bash
# Builds every shipping artifact (scripts/test.sh runs it before `cargo test`, and
# paqet-userspace/tests/shipping.rs checks what it made):
#   - the release binary for amd64 (target/release) and arm64 (target/arm64, cross-built),
#   - the arm64 sim_pair test executable, to run under qemu-user (path in target/arm64/sim_pair-test-path),
#   - the OCI images for both (target/image/paqet-dp_<version>_<arch>.oci.tar, scripts/image.sh),
#   - the .deb for both (target/deb/paqet-dp_<version>-1_<arch>.deb, scripts/deb.sh).
# Images and .debs need root (their tests skip without it); the builds do not.
# Each step's time is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
step() {
    local name=$1
    shift
    local t=$SECONDS
    "$@"
    echo "ship: $name done in $((SECONDS - t)) s" >&2
}
release() { scripts/build-release.sh "$@" | tail -n 1; }

BIN_AMD64=$(step "amd64 release build" release amd64)
BIN_ARM64=$(step "arm64 release build (cross)" release arm64)
SIM=$(step "arm64 sim_pair test build (cross)" release arm64 --test sim_pair)
echo "$SIM" >target/arm64/sim_pair-test-path
export BIN_AMD64 BIN_ARM64
if [[ $(id -u) != 0 ]]; then
    echo "ship: images and .debs skipped: not root (buildah mounts the image's root filesystem)" >&2
    exit 0
fi
step "OCI images amd64 + arm64" scripts/image.sh
step "deb amd64" env BIN="$BIN_AMD64" scripts/deb.sh amd64 >/dev/null
step "deb arm64" env BIN="$BIN_ARM64" scripts/deb.sh arm64 >/dev/null
echo "ship: all artifacts in $((SECONDS - t0)) s (target/image, target/deb)"
