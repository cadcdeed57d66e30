#!/bin/bash
# First figures: byteback vs rsync -a on the same 1 GiB tree, same run.
# A first full backup and a no-change re-run, each into a fresh local target.
# Usage: bash benches/quick_compare.sh [SIZE_MIB] (default 1024). Needs release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1024}
BIN=target/release
[ -x $BIN/byteback-backup ] || cargo build --release --workspace --bins
# BENCH_DIR: where the source, the store and rsync's copy go (e.g. a btrfs mount).
W=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/byteback-bench.XXXXXX")
cleanup() {
    # Read-only btrfs snapshots must be deleted as subvolumes; fallback ones need write bits back.
    for s in "$W"/store/*/*; do
        btrfs subvolume delete "$s" >/dev/null 2>&1 || chmod -R u+w "$s" 2>/dev/null || true
    done
    rm -rf "$W"
}
trap cleanup EXIT
SRC=$W/src
mkdir -p "$SRC"
# Half the bytes in 8 large incompressible files, half in 16 KiB-ish small files.
large=$((SIZE / 2)); per=$((large / 8))
for i in $(seq 1 8); do head -c $((per << 20)) /dev/urandom > "$SRC/large$i.bin"; done
small_bytes=$(( (SIZE - large) << 20 )); n=$((small_bytes / 16384))
python3 - "$SRC" "$n" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 500))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(os.urandom(8192) + bytes(8192))
PY
sync
bytes=$(du -sb "$SRC" | cut -f1)
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; local e=$(date +%s.%N); echo "$e - $s" | bc; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
echo "tree: $bytes bytes, $(find "$SRC" -type f | wc -l) files, on $(df -T "$W" | tail -1 | awk '{print $2}')"
drop; bb1=$(t $BIN/byteback-backup -d "$W/store" -s "$SRC" --hostname bench --retry-number 0)
drop; rs1=$(t rsync -a "$SRC/" "$W/rsync/")
rm -rf "$W/rsync2"; drop; rs1s=$(t sh -c "rsync -a '$SRC/' '$W/rsync2/' && sync")
echo 'min_snapshot_interval = 0' > "$W/store/byteback.toml"
drop; bb2=$(t $BIN/byteback-backup -d "$W/store" -s "$SRC" --hostname bench --retry-number 0)
drop; rs2=$(t rsync -a "$SRC/" "$W/rsync/")
mb() { echo "scale=1; $bytes / 1000000 / $1" | bc; }
printf '%-22s %10s %10s %8s\n' case byteback rsync ratio
printf '%-22s %8s s %8s s %7.2fx\n' "first backup" "$bb1" "$rs1" "$(echo "$rs1 / $bb1" | bc -l)"
printf '%-22s %8s MB/s %6s MB/s\n' "  throughput" "$(mb $bb1)" "$(mb $rs1)"
printf '%-22s %8s s %8s s %7.2fx  (rsync followed by sync: byteback commits durably)\n' "first, durable" "$bb1" "$rs1s" "$(echo "$rs1s / $bb1" | bc -l)"
printf '%-22s %8s s %8s s %7.2fx\n' "no-change re-run" "$bb2" "$rs2" "$(echo "$rs2 / $bb2" | bc -l)"
printf '%-22s %8s MB/s %6s MB/s\n' "  throughput" "$(mb $bb2)" "$(mb $rs2)"
