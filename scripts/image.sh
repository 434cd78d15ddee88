#!/usr/bin/env bash
# Builds the paqet-dp OCI image for amd64 and arm64 with buildah, from scratch (no base image, no
# registry): the release binary, the shared libraries it loads (found from its ELF NEEDED entries, for
# the image's architecture) and their loader; no shell, no CA bundle. Writes one OCI archive per
# architecture:
#
#   $OUT/paqet-dp_<version>_<arch>.oci.tar      (OUT default: target/image)
#
# named docker.io/library/paqet-dp:<version>, which is what the Helm chart's default `image.repository:
# paqet-dp` and tag (the chart's appVersion = the crate version) resolve to on a node. Load it with
# `podman load -i ...`, `ctr -n k8s.io images import ...`, or push it with `skopeo copy oci-archive:... docker://...`
# (docs/runbook.md §5).
#
# The binary carries the capabilities the chart grants (NET_RAW NET_ADMIN BPF PERFMON IPC_LOCK) as
# permitted-only file capabilities: as root nothing changes; as a non-root user the process gets those
# of them the runtime grants and makes them effective itself, and `exec` never fails for lack of one.
#
#   scripts/image.sh               # both architectures
#   ARCHES=arm64 scripts/image.sh  # one
# Env: BIN_AMD64 / BIN_ARM64 use an already built binary instead of building it (scripts/build-release.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/image}
ARCHES=${ARCHES:-amd64 arm64}
NAME=docker.io/library/paqet-dp
CAPS=cap_net_raw,cap_net_admin,cap_bpf,cap_perfmon,cap_ipc_lock+p

for t in buildah readelf setcap; do
    command -v "$t" >/dev/null || { echo "image: $t missing (run scripts/setup.sh)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "image: run as root (buildah mounts the image's root filesystem)" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
DIRTY=unknown
if [[ $COMMIT != unknown ]]; then
    if [[ -z $(git status --porcelain --untracked-files=no) ]]; then DIRTY=false; else DIRTY=true; fi
fi
mkdir -p "$OUT"
# A private image store inside the output directory: nothing touches the host's containers storage.
BUILDAH=(buildah --root "$OUT/storage" --runroot "$OUT/run" --storage-driver vfs)

# Prints "<soname path-on-host>" for every shared object $1 needs, recursively, looked up in $2..
needed() {
    local bin=$1
    shift
    local -A seen=()
    local queue=("$bin")
    while ((${#queue[@]})); do
        local f=${queue[0]}
        queue=("${queue[@]:1}")
        local so
        for so in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            [[ -n ${seen[$so]:-} ]] && continue
            local d found=
            for d in "$@"; do
                if [[ -e $d/$so ]]; then found=$d/$so; break; fi
            done
            [[ -n $found ]] || { echo "image: $so (needed by $f) not found in $*" >&2; return 1; }
            seen[$so]=$found
            echo "$so $found"
            queue+=("$found")
        done
    done
}

for arch in $ARCHES; do
    case $arch in
    amd64) triple=x86_64-linux-gnu; bin=${BIN_AMD64:-} ;;
    arm64) triple=aarch64-linux-gnu; bin=${BIN_ARM64:-} ;;
    *) echo "image: unknown architecture $arch" >&2; exit 2 ;;
    esac
    if [[ -z $bin ]]; then
        echo "image: building the $arch release binary"
        bin=$(scripts/build-release.sh "$arch" | tail -n 1)
    fi
    [[ -x $bin ]] || { echo "image: $bin is not an executable" >&2; exit 1; }

    stage=$(mktemp -d "$OUT/rootfs-$arch.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    install -D -m 0755 "$bin" "$stage/usr/bin/paqet-dp"
    # DWARF stays out of the image; the symbol table stays (CPU/heap profiles are symbolized with it).
    objcopy=objcopy
    [[ $arch == arm64 ]] && objcopy=aarch64-linux-gnu-objcopy
    "$objcopy" --strip-debug "$stage/usr/bin/paqet-dp"
    interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
    install -D -m 0755 "$(readlink -f "$interp")" "$stage$interp"
    while read -r so path; do
        install -D -m 0644 "$(readlink -f "$path")" "$stage/lib/$triple/$so"
    done < <(needed "$bin" "/lib/$triple" "/usr/lib/$triple")
    install -d -m 0755 "$stage/etc/paqet-dp" "$stage/tmp"
    chmod 1777 "$stage/tmp"
    printf 'root:x:0:0:root:/:/usr/bin/paqet-dp\nnonroot:x:65532:65532:nonroot:/:/usr/bin/paqet-dp\n' >"$stage/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$stage/etc/group"
    setcap "$CAPS" "$stage/usr/bin/paqet-dp"

    ctr=$("${BUILDAH[@]}" from --arch "$arch" --os linux scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    # cp -a keeps the file capability (security.capability xattr); buildah commit writes it to the layer.
    cp -a "$stage/." "$mnt/"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config \
        --arch "$arch" --os linux \
        --entrypoint '["/usr/bin/paqet-dp"]' --cmd 'run -c /etc/paqet-dp/config.toml' \
        --workingdir / --user 0:0 \
        --label org.opencontainers.image.title=paqet-dp \
        --label org.opencontainers.image.description="KCP over raw TCP packets (wire-compatible paqet), XDP/pcap data plane" \
        --label org.opencontainers.image.version="$VERSION" \
        --label org.opencontainers.image.revision="$COMMIT" \
        --label org.opencontainers.image.licenses="MIT OR Apache-2.0" \
        --label io.paqet-dp.dirty="$DIRTY" \
        --label io.paqet-dp.wire=v1.0.0-alpha.21 \
        "$ctr"
    archive=$OUT/paqet-dp_${VERSION}_${arch}.oci.tar
    rm -f "$archive"
    "${BUILDAH[@]}" commit --quiet --format oci --rm "$ctr" "$NAME:$VERSION-$arch" >/dev/null
    "${BUILDAH[@]}" push --quiet "$NAME:$VERSION-$arch" "oci-archive:$archive:$NAME:$VERSION"
    rm -rf "$stage"
    trap - EXIT
    echo "image: $archive ($arch, $(du -h "$archive" | cut -f1), commit $COMMIT, dirty $DIRTY)"
done
