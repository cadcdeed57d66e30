#!/bin/bash
# Builds byteback's Debian package (one package, client and server):
#   bash scripts/deb.sh [PROFILE]      # release (default) or dev
# -> target/debian/byteback_<version>-1_<arch>.deb
#
# The binaries are built with cargo, then byteback-gen writes the man pages
# and shell completions from the binaries' own option definitions, and the
# systemd units are copied with /usr/bin (where the package puts the
# binaries) instead of /usr/local/bin; all of that goes to target/deb-assets,
# which the assets of [package.metadata.deb] in Cargo.toml name. cargo-deb
# (`cargo install cargo-deb --version 3.8.0 --locked`) then packs it without
# building again; it strips the binaries. Extra arguments go to cargo deb
# (e.g. --output DIR, --fast).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
shift || true
case $profile in
    release) dir=target/release ;;
    dev | debug) profile=dev; dir=target/debug ;;
    *) echo "scripts/deb.sh: profile must be release or dev, not $profile" >&2; exit 2 ;;
esac
if ! cargo deb --version >/dev/null 2>&1; then
    echo "scripts/deb.sh: cargo-deb is missing: cargo install cargo-deb --version 3.8.0 --locked" >&2
    exit 1
fi
# BYTEBACK_DEB_PREBUILT=1: the binaries are built already (tests/integration/deb.rs).
if [ -z "${BYTEBACK_DEB_PREBUILT:-}" ]; then
    cargo build --profile "$profile" --workspace --bins
fi
for b in byteback-backup byteback-restore byteback-setup-client byteback-server byteback-prune byteback-gen; do
    [ -x "$dir/$b" ] || { echo "scripts/deb.sh: $dir/$b is missing (cargo build --workspace --bins)" >&2; exit 1; }
done
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/systemd"
"$dir/byteback-gen" man "$assets/man" >/dev/null
gzip -9n "$assets"/man/man*/*
"$dir/byteback-gen" completions "$assets/completions" >/dev/null
for unit in packaging/systemd/*.service packaging/systemd/*.timer; do
    sed -e 's|/usr/local/bin/|/usr/bin/|g' \
        -e 's|installed by the README (/usr/local/bin)|installed by the Debian package (/usr/bin)|' \
        -e 's|Binaries in /usr/local/bin;|Binaries in /usr/bin;|' \
        "$unit" >"$assets/systemd/$(basename "$unit")"
done
if grep -q /usr/local "$assets"/systemd/*; then
    echo "scripts/deb.sh: a unit still names /usr/local:" >&2
    grep -n /usr/local "$assets"/systemd/* >&2
    exit 1
fi
cargo deb -p byteback --no-build --profile "$profile" --strip "$@"
