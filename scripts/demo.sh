#!/usr/bin/env bash
# paqet-dp demo (run as root): two network namespaces joined by a veth pair, a paqet-dp server in one and a
# paqet-dp client in the other (mode fast3, cipher aes, a SOCKS5 listener and a TCP forward), an HTTP server
# in the server namespace, a file fetched through the tunnel with curl (SOCKS5 when this build serves it,
# the TCP forward otherwise), then throughput, latency and the daemons' metrics are printed. Everything is
# removed on exit. Traffic stays inside the two namespaces.
#
# The data path is `--mode auto` (XDP where the kernel and driver have it, pcap otherwise); the demo prints
# which one each daemon took.
#
#   sudo scripts/demo.sh                 # 64 MiB file, data path "auto"
#   DEMO_MB=256 DEMO_MODE=pcap sudo -E scripts/demo.sh   # auto|xdp|xdp-native|xdp-generic|pcap
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
MB=${DEMO_MB:-64}
MODE=${DEMO_MODE:-auto}
PORT=9999
KEY=paqet-dp-demo-key

if [[ $(id -u) -ne 0 ]]; then
    echo "demo: needs root (network namespaces, veth, raw packets, iptables): sudo $0" >&2
    exit 1
fi
for tool in ip iptables ethtool curl python3 sha256sum cargo; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "demo: $tool is missing; running scripts/setup.sh"
        scripts/setup.sh
        break
    fi
done

# bpf-linker (installed by scripts/setup.sh) lets the build include the XDP program (DEMO_MODE=auto|xdp-*).
if [[ -f ${TMPDIR:-/tmp}/paqet-dp-bpf-linker-path ]]; then
    PATH="$(cat "${TMPDIR:-/tmp}/paqet-dp-bpf-linker-path"):$PATH"
else
    for d in "${PAQET_TOOLS:-$HOME/.cache/paqet-dp-tools}"/*/bin; do
        [[ -x $d/bpf-linker ]] && PATH="$d:$PATH"
    done
fi
export PATH
echo "demo: building paqet-dp (release)"
cargo build --release --quiet -p paqet-userspace --bin paqet-dp
BIN=$ROOT/target/release/paqet-dp

ID=$$
NS_C=pqdemo${ID}c
NS_S=pqdemo${ID}s
DEV_C=pqd${ID}c
DEV_S=pqd${ID}s
IP_C=10.219.0.1
IP_S=10.219.0.2
MAC_C=02:00:00:de:00:01
MAC_S=02:00:00:de:00:02
WORK=$(mktemp -d /tmp/paqet-demo.XXXXXX)
PIDS=()

cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$NS_C" 2>/dev/null || true
    ip netns del "$NS_S" 2>/dev/null || true
    if ((rc != 0)); then
        for f in "$WORK"/*.log; do
            [[ -f $f ]] || continue
            echo "---- $(basename "$f") (last lines) ----"
            tail -n 15 "$f"
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_c() { ip netns exec "$NS_C" "$@"; }
in_s() { ip netns exec "$NS_S" "$@"; }

echo "demo: namespaces $NS_C (client, $IP_C) and $NS_S (server, $IP_S)"
ip netns add "$NS_C"
ip netns add "$NS_S"
ip link add "$DEV_C" netns "$NS_C" type veth peer name "$DEV_S" netns "$NS_S"
in_c ip link set "$DEV_C" address "$MAC_C"
in_s ip link set "$DEV_S" address "$MAC_S"
in_c ip addr add "$IP_C/24" dev "$DEV_C"
in_s ip addr add "$IP_S/24" dev "$DEV_S"
for ns in "$NS_C" "$NS_S"; do ip netns exec "$ns" ip link set lo up; done
in_c ip link set "$DEV_C" up
in_s ip link set "$DEV_S" up
in_c ethtool -K "$DEV_C" tx off >/dev/null
in_s ethtool -K "$DEV_S" tx off >/dev/null

# The host rules of the pcap path (spec §2.4 plus paqet-dp's raw PREROUTING DROP): no conntrack, no RSTs,
# and the kernel's stack never processes tunnel packets (the capture tap runs before netfilter).
in_s iptables -t raw -A PREROUTING -p tcp --dport $PORT -j NOTRACK
in_s iptables -t raw -A PREROUTING -p tcp --dport $PORT -j DROP
in_s iptables -t raw -A OUTPUT -p tcp --sport $PORT -j NOTRACK
in_s iptables -t mangle -A OUTPUT -p tcp --sport $PORT --tcp-flags RST RST -j DROP
in_c iptables -t raw -A PREROUTING -p tcp -s $IP_S --sport $PORT -j NOTRACK
in_c iptables -t raw -A PREROUTING -p tcp -s $IP_S --sport $PORT -j DROP
in_c iptables -t raw -A OUTPUT -p tcp -d $IP_S --dport $PORT -j NOTRACK
in_c iptables -t mangle -A OUTPUT -p tcp -d $IP_S --dport $PORT --tcp-flags RST RST -j DROP

cat >"$WORK/server.toml" <<EOF
role = "server"
[log]
level = "info"
[listen]
addr = ":$PORT"
[network]
interface = "$DEV_S"
[network.ipv4]
addr = "$IP_S:$PORT"
router_mac = "$MAC_C"
[transport]
protocol = "kcp"
[transport.kcp]
mode = "fast3"
sndwnd = 2048
rcvwnd = 2048
block = "aes"
key = "$KEY"
[metrics]
listen = "127.0.0.1:9090"
EOF

cat >"$WORK/client.toml" <<EOF
role = "client"
[log]
level = "info"
[server]
addr = "$IP_S:$PORT"
[network]
interface = "$DEV_C"
[network.ipv4]
addr = "$IP_C:0"
router_mac = "$MAC_S"
[transport]
protocol = "kcp"
[transport.kcp]
mode = "fast3"
sndwnd = 2048
rcvwnd = 2048
block = "aes"
key = "$KEY"
[metrics]
listen = "127.0.0.1:9090"
[[socks5]]
listen = "127.0.0.1:1080"
[[forward]]
listen = "127.0.0.1:18000"
target = "127.0.0.1:8000"
protocol = "tcp"
EOF

echo "demo: serving a $MB MiB file from the server namespace (127.0.0.1:8000)"
mkdir -p "$WORK/www"
head -c $((MB << 20)) /dev/urandom >"$WORK/www/file.bin"
printf 'hello through paqet-dp\n' >"$WORK/www/hello.txt"
WANT=$(sha256sum "$WORK/www/file.bin" | cut -d' ' -f1)
# Background processes are started with `ip netns exec` directly (it execs in place), so $! is their pid.
ip netns exec "$NS_S" python3 -m http.server 8000 --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/http.log" 2>&1 &
PIDS+=($!)

echo "demo: starting paqet-dp server and client (mode fast3, 2048-packet windows, aes, data path $MODE)"
# The configs hold the key: the daemon refuses them unless only root can read them.
chmod 600 "$WORK/server.toml" "$WORK/client.toml"
ip netns exec "$NS_S" "$BIN" run -c "$WORK/server.toml" --mode "$MODE" >/dev/null 2>"$WORK/server.log" &
PIDS+=($!)
ip netns exec "$NS_C" "$BIN" run -c "$WORK/client.toml" --mode "$MODE" >/dev/null 2>"$WORK/client.log" &
PIDS+=($!)

# Ready when a small request makes it through the forward (bounded wait).
ready=0
for _ in $(seq 1 100); do
    if in_c curl -s --max-time 2 -o /dev/null http://127.0.0.1:18000/hello.txt; then ready=1; break; fi
    sleep 0.2
done
if ((ready == 0)); then
    echo "demo: the tunnel did not come up within 20 s" >&2
    exit 1
fi

# Which data path each daemon took (paqet_datapath_mode is 1 for the one in use).
datapath() {
    ip netns exec "$1" curl -s --max-time 2 http://127.0.0.1:9090/metrics |
        sed -n 's/^paqet_datapath_mode{mode="\([^"]*\)"} 1$/\1/p' | head -n 1
}
DP_S=$(datapath "$NS_S")
DP_C=$(datapath "$NS_C")
echo "demo: data path (--mode $MODE): server ${DP_S:-unknown}, client ${DP_C:-unknown}"

# SOCKS5 when this build serves it, the TCP forward otherwise.
if in_c curl -s --max-time 3 -o /dev/null --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:8000/hello.txt; then
    VIA="SOCKS5 (socks5h://127.0.0.1:1080)"
    CURL=(curl --socks5-hostname 127.0.0.1:1080)
    URL=http://127.0.0.1:8000
else
    VIA="the TCP forward 127.0.0.1:18000 (this build serves no SOCKS5 yet)"
    CURL=(curl)
    URL=http://127.0.0.1:18000
fi

echo "demo: fetching $MB MiB through the tunnel via $VIA"
stats=$(in_c "${CURL[@]}" -s --max-time 90 -o "$WORK/got.bin" -w '%{size_download} %{time_total}' "$URL/file.bin")
read -r size secs <<<"$stats"
GOT=$(sha256sum "$WORK/got.bin" | cut -d' ' -f1)
if [[ $GOT != "$WANT" ]]; then
    echo "demo: FAILED: the fetched file differs (sha256 $GOT, expected $WANT, $size bytes)" >&2
    exit 1
fi
python3 -c "import sys; s,t=float(sys.argv[1]),float(sys.argv[2]); print(f'demo: throughput {s/t/1e6:.1f} MB/s ({s/1048576:.0f} MiB in {t:.2f} s), sha256 verified')" "$size" "$secs"

# Latency: 20 new connections, each fetching a 23-byte file through the tunnel; median and worst of curl's total time.
for _ in $(seq 1 20); do
    in_c "${CURL[@]}" -s --max-time 5 -o /dev/null -w '%{time_total}\n' "$URL/hello.txt" || true
done >"$WORK/lat.txt"
python3 - "$WORK/lat.txt" <<'EOF'
import statistics, sys
v = sorted(float(x) * 1e3 for x in open(sys.argv[1]) if x.strip())
print(f"demo: latency of a new connection + small HTTP GET through the tunnel: median {statistics.median(v):.2f} ms, max {v[-1]:.2f} ms over {len(v)}")
EOF

for side in server client; do
    ns=$NS_S; [[ $side == client ]] && ns=$NS_C
    if m=$(ip netns exec "$ns" curl -s --max-time 2 http://127.0.0.1:9090/metrics); then
        echo "demo: $side metrics:"
        grep -E '^paqet_(datapath_mode|sessions|streams|stream_opens_total|bytes_total|packets_total|kcp_retransmissions_total|kcp_srtt_seconds|crypto_failures_total|pcap_kernel_drops_total)' <<<"$m" \
            | grep -vE ' 0$' | sed 's/^/    /' || true
    else
        echo "demo: $side metrics: not served by this build (metrics.listen 127.0.0.1:9090)"
    fi
done
echo "demo: ok (cleaning up)"
