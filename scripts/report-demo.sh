#!/bin/bash
# Makes a demo store (three hosts, two months of daily backups through the
# real byteback-backup and byteback-server, with the server's clock moved by
# --now), writes its report and a screenshot of it (headless Chromium):
#   bash scripts/report-demo.sh OUTDIR      # OUTDIR/index.html, OUTDIR/report.png
# docs/report.png in the README was made this way. Uses target/debug's binaries.
set -euo pipefail
export TZ=UTC
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: scripts/report-demo.sh OUTDIR}")
bin=$PWD/target/debug
work=$(mktemp -d)
# The store on a small btrfs filesystem (as root), so the free-space chart moves.
if [ "$(id -u)" = 0 ]; then
    truncate -s 1200M "$work/img"
    mkfs.btrfs -q "$work/img"
    mkdir "$work/mnt"
    mount -o loop,user_subvol_rm_allowed "$work/img" "$work/mnt"
    trap 'umount "$work/mnt"; rm -rf "$work"' EXIT
    store=$work/mnt/store
else
    trap 'rm -rf "$work"' EXIT
    store=$work/store
fi
mkdir -p "$store" "$out"
echo "min_snapshot_interval = 21600" >"$store/byteback.toml"
cat >"$work/server" <<EOS
#!/bin/sh
exec '$bin/byteback-server' "\$@" --now "\$BYTEBACK_TEST_NOW"
EOS
chmod +x "$work/server"
now=$(date -u -d '2026-11-27 15:00' +%s)
day=86400
backup() { # host time
    BYTEBACK_SERVER=$work/server BYTEBACK_TEST_NOW=$(date -u -d "@$2" +%Y-%m-%dT%H:%M:%SZ) \
        "$bin/byteback-backup" --destination "$store" --source "$work/src-$1" \
        --hostname "$1" --retry-number 0 -q
}
for host in web1.example.com db1.example.com mail.example.com; do
    mkdir -p "$work/src-$host"
    head -c $((2 << 20)) /dev/urandom >"$work/src-$host/base"
done
for d in $(seq 60 -1 0); do
    t=$((now - d * day - 12 * 3600))
    for host in web1.example.com db1.example.com mail.example.com; do
        case $host in
            db1*) [ "$d" -lt 2 ] && continue ;;        # missed the last nights: WARNING
            mail*) [ "$d" -lt 5 ] && continue          # down for 5 days: CRITICAL
                   [ $((d % 3)) = 0 ] && continue ;;   # and only every other night before
        esac
        # Some new data every night, more now and then.
        n=$(( (d * 7 + ${#host}) % 5 + 1 ))
        [ $((d % 11)) = 0 ] && n=$((n * 4))
        head -c $((n * 256 * 1024)) /dev/urandom >"$work/src-$host/night-$((d % 9))"
        backup "$host" "$((t + ${#host} * 60))"
    done
done
"$bin/byteback-server" report --store "$store" --html "$out" --now "$(date -u -d "@$now" +%Y-%m-%dT%H:%M:%SZ)"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1040,820 \
    --screenshot="$out/report.png" "file://$out/index.html" 2>/dev/null
echo "$out/report.png"
