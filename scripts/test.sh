#!/bin/bash
# Runs every test of byteback, installing what the tests need first.
# As root (CI) it installs the system packages; real sshd, btrfs on a loop
# device and rsync are then used by the tests; man, groff, zsh, fish and
# systemd-analyze check the generated man pages, completions and systemd
# units (tests/integration/ops.rs); MariaDB and PostgreSQL servers, each
# test starting its own on a private socket, check the shipped database dump
# hooks (tests/integration/databases.rs); cargo-deb and dpkg build and install
# the Debian package (tests/integration/deb.rs); headless Chromium renders
# the HTML report (tests/integration/report.rs). The integration tests are one
# binary (cargo test --test integration [AREA::[NAME]]) whose areas run
# concurrently.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in btrfs:btrfs-progs mkfs.btrfs:btrfs-progs rsync:rsync sshd:openssh-server /usr/sbin/sshd:openssh-server \
            setfacl:acl getfattr:attr losetup:mount pgrep:procps pkill:procps kill:procps \
            ssh:openssh-client ssh-keygen:openssh-client useradd:passwd chpasswd:passwd \
            man:man-db groff:groff-base systemd-analyze:systemd zsh:zsh fish:fish \
            /usr/sbin/mariadbd:mariadb-server mariadb-install-db:mariadb-server \
            mariadb:mariadb-client mariadb-dump:mariadb-client mariadb-admin:mariadb-client \
            pg_ctlcluster:postgresql pg_dumpall:postgresql setpriv:util-linux /usr/sbin/runuser:util-linux \
            gzip:gzip mkfs.ext4:e2fsprogs filefrag:e2fsprogs chromium:chromium \
            dpkg-deb:dpkg strip:binutils objcopy:binutils script:bsdutils; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then need+=("$pkg"); fi
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing: ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing packages (run as root to install): ${need[*]}" >&2
    fi
fi
# cargo-deb for the Debian package test (tests/integration/deb.rs, scripts/deb.sh); pinned
# to a version that builds on this toolchain (its MSRV is 1.85).
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing: cargo-deb 3.8.0" >&2
    cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
# The loop driver for btrfs images.
[ "$(id -u)" = 0 ] && modprobe loop 2>/dev/null || true

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
log=$(mktemp)
# The client's records of its last backups, kept apart from the machine's
# (/var/cache/byteback, root's): only the package test writes there.
BYTEBACK_CACHE_DIR=$(mktemp -d)
export BYTEBACK_CACHE_DIR
trap 'rm -rf "$log" "$BYTEBACK_CACHE_DIR"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# Smoke run of the throughput harness (benches/e2e): every workload once at
# --quick sizes against the debug binaries just built, about two minutes.
# It fails loudly if byteback or rsync fails; the figures themselves never
# fail it (they are measured, not asserted).
smoke=pass
if [ "$(id -u)" = 0 ]; then
    if ! cargo bench --profile dev --bench e2e -- --quick --runs 1 >"$log.e2e" 2>&1; then
        cat "$log.e2e"
        echo "throughput harness smoke run FAILED" >&2
        status=1
        smoke=fail
    else
        tail -n 25 "$log.e2e"
    fi
    rm -f "$log.e2e"
else
    if [ -n "${CI:-}" ]; then
        echo "throughput harness smoke run FAILED: it needs root, and CI is set" >&2
        status=1
        smoke=fail
    else
        echo "throughput harness smoke run skipped: needs root" >&2
        smoke=skip
    fi
fi
# The failing tests' panics again, last, where a short excerpt of the
# run's output (a CI summary) still shows them: at most 60 lines of each
# failing test, then the list of their names.
awk '/^failures:$/ || /^---- .* ----$/ { on = 1; n = 0 } on && n < 60 { print; n += 1 } /^test result:/ { on = 0 }' "$log" >&2
# One closing line for the whole run (cargo prints one per test binary).
awk -v smoke="$smoke" '/^test result:/ { p += $4; f += $6 }
    END { if (smoke == "pass") p += 1; if (smoke == "fail") f += 1; printf "total: %d passed, %d failed\n", p, f }' "$log"
exit $status
