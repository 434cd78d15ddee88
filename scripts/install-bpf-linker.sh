#!/usr/bin/env bash
# Installs bpf-linker (needed to build the paqet-ebpf XDP program) linked against the nightly rustc's
# own libLLVM, so no Debian LLVM is needed and the LLVM major always matches rustc's bitcode.
#
# Idempotent: the result is cached OUTSIDE the clone, in ${PAQET_TOOLS:-$HOME/.cache/paqet-dp-tools},
# in a sub-directory keyed by a hash of `rustc +nightly -vV` (a nightly update gives a new key and a
# rebuild, ~40 s). On success the LAST line of stdout is the bin directory to put on PATH:
#
#     export PATH="$(scripts/install-bpf-linker.sh | tail -n1):$PATH"
#
# Also makes sure the nightly toolchain has `rust-src` (for `-Z build-std=core`). Never updates
# toolchains (no `rustup update`).
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
log() { echo "install-bpf-linker: $*" >&2; }

if ! command -v rustup >/dev/null 2>&1; then
    log "rustup is not on PATH"; exit 1
fi
if ! rustc +nightly -vV >/dev/null 2>&1; then
    log "no nightly toolchain (rustc +nightly fails); the eBPF build needs one"; exit 1
fi
rustup component add rust-src --toolchain nightly >/dev/null 2>&1 \
    || rustup component add rust-src --toolchain nightly >&2

NIGHTLY_VV=$(rustc +nightly -vV)
LLVM_MAJOR=$(sed -n 's/^LLVM version: \([0-9]*\).*/\1/p' <<<"$NIGHTLY_VV")
if [ -z "$LLVM_MAJOR" ]; then
    log "cannot read the LLVM version from 'rustc +nightly -vV'"; exit 1
fi
KEY=$(printf '%s\nbpf-linker %s\n' "$NIGHTLY_VV" "$BPF_LINKER_VERSION" | sha256sum | cut -c1-16)
TOOLS_ROOT=${PAQET_TOOLS:-$HOME/.cache/paqet-dp-tools}
DIR="$TOOLS_ROOT/bpf-linker-$KEY"
BIN="$DIR/bin"

if [ -x "$BIN/bpf-linker" ] && "$BIN/bpf-linker" --version >/dev/null 2>&1; then
    log "cached: $BIN/bpf-linker ($("$BIN/bpf-linker" --version 2>/dev/null | head -n1))"
    echo "$BIN"
    exit 0
fi

SYSROOT=$(rustc +nightly --print sysroot)
LIBLLVM=$(cd "$SYSROOT/lib" && ls libLLVM.so.*-rust-* 2>/dev/null | head -n1 || true)
if [ -z "$LIBLLVM" ]; then
    log "no libLLVM.so.*-rust-* in $SYSROOT/lib; cannot link bpf-linker against rustc's LLVM"; exit 1
fi

# Two symlinks are all bpf-linker's build.rs needs: `-lLLVM` at link time (libLLVM.so) and the
# SONAME, found through the RUNPATH (= $LLVM_PREFIX/lib) at run time.
mkdir -p "$DIR/llvm/lib"
ln -sfn "$SYSROOT/lib/$LIBLLVM" "$DIR/llvm/lib/libLLVM.so"
ln -sfn "$SYSROOT/lib/$LIBLLVM" "$DIR/llvm/lib/$LIBLLVM"

log "building bpf-linker $BPF_LINKER_VERSION against $LIBLLVM (llvm-$LLVM_MAJOR) into $DIR (~40 s)"
start=$(date +%s)
LLVM_PREFIX="$DIR/llvm" cargo +stable install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
    --no-default-features --features "llvm-$LLVM_MAJOR" --root "$DIR" >&2
log "built in $(( $(date +%s) - start )) s"

"$BIN/bpf-linker" --version >&2
echo "$BIN"
