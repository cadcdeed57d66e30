//! End-to-end throughput harness: byteback against rsync, same workloads,
//! same run, same kind of disc.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench --bench e2e -- [--quick] [--runs N] [--only W1,W3] [--json FILE]
//!                            [--workdir DIR] [--bin-dir DIR] [--real-tree DIR]
//!                            [--million] [--image-gib N] [--verbose]
//! ```
//!
//! Needs root (loop device, btrfs quotas, dropping caches). Builds the
//! workloads on a fresh btrfs loop filesystem with quotas on, runs byteback
//! and rsync alternately (the order flips every repeat) with caches dropped
//! before each timed run, prints a table and writes JSON. A failing tool
//! aborts the run with its output; performance figures never fail it.
//! W7 (a million tiny files; 100,000 with `--quick`) runs in quick mode and,
//! at full size, only with `--million` or `--only W7`. R1 and R2 restore
//! what W1 and W2 backed up (each tool from its own store, into an emptied
//! directory, from a cold cache).

mod btrfs;
mod measure;
mod report;
// The tests' splitmix64, so the harness and the tests share one copy.
#[allow(dead_code)]
#[path = "../../tests/integration/util/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../../tests/integration/util/sshd.rs"]
mod sshd;
mod tools;
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use report::{Goal, Row};
use tools::{Bench, Sample, SshSetup, Tool, Transport};
use workload::Sizes;

struct Args {
    quick: bool,
    runs: usize,
    only: Option<Vec<String>>,
    json: Option<PathBuf>,
    workdir: PathBuf,
    bin_dir: Option<PathBuf>,
    real_tree: Option<PathBuf>,
    million: bool,
    image_gib: Option<u64>,
    verbose: bool,
    ssh: bool,
    loop_direct: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench e2e -- [--quick] [--runs N] [--only W1,W2,..] [--json FILE]\n\
         \x20      [--workdir DIR] [--bin-dir DIR] [--real-tree DIR] [--million] [--image-gib N] [--verbose]\n\
         \x20      [--transport local|ssh] [--loop buffered|direct]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        quick: false,
        runs: 3,
        only: None,
        json: None,
        workdir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e"),
        bin_dir: None,
        real_tree: None,
        million: false,
        image_gib: None,
        verbose: false,
        ssh: false,
        loop_direct: false,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy().into_owned();
        let mut value = || {
            it.next()
                .unwrap_or_else(|| {
                    eprintln!("{arg} needs a value");
                    usage()
                })
                .to_string_lossy()
                .into_owned()
        };
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--runs" => a.runs = value().parse().unwrap_or_else(|_| usage()),
            "--only" => {
                a.only = Some(
                    value()
                        .split(',')
                        .map(|s| s.trim().to_uppercase())
                        .collect(),
                )
            }
            "--json" => a.json = Some(value().into()),
            "--workdir" => a.workdir = value().into(),
            "--bin-dir" => a.bin_dir = Some(value().into()),
            "--real-tree" => a.real_tree = Some(value().into()),
            "--million" => a.million = true,
            "--image-gib" => a.image_gib = Some(value().parse().unwrap_or_else(|_| usage())),
            "--verbose" | "-v" => a.verbose = true,
            "--loop" => match value().as_str() {
                "direct" => a.loop_direct = true,
                "buffered" => a.loop_direct = false,
                _ => usage(),
            },
            "--transport" => match value().as_str() {
                "local" => a.ssh = false,
                "ssh" => a.ssh = true,
                _ => usage(),
            },
            // cargo bench passes --bench to harness-less targets.
            "--bench" => {}
            "--help" | "-h" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    if a.runs == 0 {
        usage();
    }
    a
}

/// `target/release` when run by `cargo bench` (the harness sits in
/// `target/release/deps`), or whatever `--bin-dir` says.
fn find_bins(explicit: Option<PathBuf>) -> PathBuf {
    let dir = explicit.unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let deps = exe.parent().expect("exe dir");
        if deps.file_name().is_some_and(|n| n == "deps") {
            deps.parent().expect("profile dir").to_path_buf()
        } else {
            deps.to_path_buf()
        }
    });
    for b in ["byteback-backup", "byteback-server"] {
        if !dir.join(b).is_file() {
            eprintln!(
                "e2e: {} not found; build the binaries first:\n    cargo build --release --workspace --bins\n\
                 (or point --bin-dir at a directory holding byteback-backup and byteback-server)",
                dir.join(b).display()
            );
            std::process::exit(2);
        }
    }
    dir
}

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "--wrap") {
        tools::wrap_main(&argv[2..]);
    }
    if let Some(real) = std::env::var_os(measure::RELAY_SERVER_ENV) {
        measure::relay_main(real.into());
    }
    let args = parse_args();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("e2e: needs root (loop device, btrfs quotas, drop_caches)");
        std::process::exit(2);
    }
    for tool in ["rsync", "mkfs.btrfs", "btrfs", "losetup"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("e2e: `{tool}` not found (apt-get install rsync btrfs-progs)");
            std::process::exit(2);
        }
    }
    let bin_dir = find_bins(args.bin_dir.clone());
    measure::become_subreaper();
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(t) = &args.real_tree {
        sizes.real_tree = t.clone();
    }
    let wanted = |w: &str| {
        args.only.as_ref().is_none_or(|o| o.iter().any(|x| x == w))
            && (w != "W7" || args.million || args.quick || args.only.is_some())
    };
    let image_gib = args.image_gib.unwrap_or(if args.quick { 4 } else { 24 });
    let started = Instant::now();
    eprintln!(
        "e2e: {} mode, {} runs each, binaries from {}, btrfs image {} GiB in {}",
        if args.quick { "quick" } else { "full" },
        args.runs,
        bin_dir.display(),
        image_gib,
        args.workdir.display()
    );
    let fs = btrfs::LoopFs::new(&args.workdir, image_gib, args.loop_direct);
    let loop_io = if fs.direct_io {
        "loop device with direct I/O"
    } else {
        "loop device through the image's page cache"
    };
    let src_root = fs.mount.join("src");
    fs.subvolume_create(&src_root);
    // Kept alive (sshd running, account present) until the results are written.
    let mut _sshd = None;
    let transport = if args.ssh {
        let (sshd, setup) = ssh_setup(&fs.mount, &bin_dir);
        _sshd = Some(sshd);
        Transport::Ssh(setup)
    } else {
        Transport::Local
    };
    let mut bench = Bench::new(fs, transport, bin_dir.clone(), args.verbose);
    let mut rows: Vec<Row> = vec![];
    let runs = args.runs;

    // W1 and W3: many small files, then the same again unchanged; R1 restores them.
    if wanted("W1") || wanted("W3") || wanted("R1") {
        let src = src_root.join("small");
        let bytes = workload::small_files(&src, sizes.small_files, 1);
        let desc = format!(
            "{} small files (1-16 KiB), {}",
            sizes.small_files,
            mib(bytes)
        );
        if wanted("W1") || wanted("W3") {
            rows.push(first_backup(&mut bench, "W1", &desc, &src, runs, bytes));
        } else {
            untimed_backup(&mut bench, "W1", &src);
        }
        if wanted("W3") {
            rows.push(repeat(
                &mut bench,
                "W3",
                "W1 again, nothing changed",
                &src,
                runs,
                bytes,
                |_| {},
            ));
        }
        if wanted("R1") {
            let desc = "restore of W1's tree (the latest snapshot, all of it)";
            rows.push(restore(&mut bench, "R1", desc, runs, bytes));
        }
    }
    // W2, W4, W5: large incompressible files, first backup, rewrites, appends.
    // R2 restores W2's tree.
    if wanted("W2") || wanted("W4") || wanted("W5") || wanted("W9") || wanted("R2") {
        let src = src_root.join("large");
        let bytes = workload::large_files(&src, sizes.large_files, sizes.large_size, 2);
        let desc = format!(
            "{} x {} incompressible files",
            sizes.large_files,
            mib(sizes.large_size)
        );
        rows.push(first_backup(&mut bench, "W2", &desc, &src, runs, bytes));
        if wanted("R2") {
            let desc = "restore of W2's tree (the latest snapshot, all of it)";
            rows.push(restore(&mut bench, "R2", desc, runs, bytes));
        }
        if wanted("W4") {
            let desc = format!("{} random 4 KiB rewrites in each W2 file", sizes.rewrites);
            let (files, count) = (sizes.large_files, sizes.rewrites);
            rows.push(repeat(&mut bench, "W4", &desc, &src, runs, bytes, |i| {
                workload::rewrite_blocks(&src, files, count, 400 + i as u64);
            }));
        }
        if wanted("W5") {
            let desc = format!("{} appended to each W2 file", mib(sizes.append));
            let (files, add) = (sizes.large_files, sizes.append);
            rows.push(repeat(&mut bench, "W5", &desc, &src, runs, bytes, |i| {
                workload::append(&src, files, add, 500 + i as u64);
            }));
        }
    }
    // W9 last in the group: it shifts every later byte of each file.
    if wanted("W9") {
        let src = src_root.join("large");
        let bytes = sizes.large_files as u64 * sizes.large_size;
        let files = sizes.large_files;
        rows.push(repeat(
            &mut bench,
            "W9",
            "7 bytes inserted near the start of each W2 file",
            &src,
            runs,
            bytes,
            |i| {
                workload::insert(&src, files, 900 + i as u64);
            },
        ));
    }
    // W8: a big file renamed and a copy of it made, after a first backup
    // of it (not timed).
    if wanted("W8") {
        let src = src_root.join("moves");
        let bytes = workload::moved_file(&src, sizes.moved, 8);
        untimed_backup(&mut bench, "W8", &src);
        let desc = format!("a {} file renamed, and a copy of it made", mib(bytes));
        rows.push(repeat(&mut bench, "W8", &desc, &src, runs, bytes, |i| {
            workload::move_and_copy(&src, i);
        }));
    }
    // W6: a real tree of this machine.
    if wanted("W6") {
        let src = sizes.real_tree.clone();
        let (bytes, entries) = workload::tree_size(&src);
        let desc = format!("{} ({} entries, {})", src.display(), entries, mib(bytes));
        rows.push(first_backup(&mut bench, "W6", &desc, &src, runs, bytes));
    }
    // W7: a million-entry tree, for the memory goal (one run; 100,000 entries in quick
    // mode, which CI runs; at full size only with --million).
    if wanted("W7") {
        let src = src_root.join("tiny");
        let bytes = workload::tiny_files(&src, sizes.million, 7);
        let desc = format!("{} tiny files (0-64 B), first backup", sizes.million);
        rows.push(first_backup(&mut bench, "W7", &desc, &src, 1, bytes));
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let machine = format!("{}; {loop_io}", report::machine());
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let goals = report::goals(&rows);
    let text = report::table(&rows, &goals);
    println!("{text}");
    println!(
        "machine: {machine}\nload average at the end: {}\ntransport: {}\nharness wall time: {:.0} s",
        load.trim(),
        bench.transport.name(),
        started.elapsed().as_secs_f64()
    );
    let json_path = args.json.clone().unwrap_or_else(|| {
        args.workdir.join(format!(
            "e2e-{}{}.json",
            bench.transport.name(),
            if args.quick { "-quick" } else { "" }
        ))
    });
    let json = report::json(
        &rows,
        &goals,
        &machine,
        load.trim(),
        &command,
        bench.transport.name(),
        args.quick,
    );
    std::fs::write(&json_path, json)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", json_path.display()));
    eprintln!("e2e: JSON written to {}", json_path.display());
    // sshd logs into the filesystem: stop it first, or the unmount waits for it.
    drop(_sshd);
    drop(bench);
    let _: Vec<Goal> = goals;
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Order of the two tools in repeat `i`: alternating, so neither always
/// runs on the caches and disc state the other left.
fn order(i: usize) -> [Tool; 2] {
    if i.is_multiple_of(2) {
        [Tool::Byteback, Tool::Rsync]
    } else {
        [Tool::Rsync, Tool::Byteback]
    }
}

fn log_sample(id: &str, i: usize, tool: Tool, s: &Sample) {
    eprintln!(
        "e2e: {id} run {} {:<8} {:>8.2} s  cpu {:>7.2} s  rss {:>7} KiB  wire {:>12}  space {:>12}",
        i + 1,
        tool.name(),
        s.wall.as_secs_f64(),
        s.cpu.as_secs_f64(),
        s.max_rss_kib(),
        s.wire_bytes,
        s.space_added
    );
}

/// A first backup, `runs` times, each into an emptied store.
fn first_backup(
    bench: &mut Bench,
    id: &str,
    desc: &str,
    src: &Path,
    runs: usize,
    bytes: u64,
) -> Row {
    let mut row = Row::new(id, desc, bytes);
    let c = bench.ceilings(src);
    eprintln!(
        "e2e: {id} ceilings: cp -a + sync {:.2} s, channel {:.2} s",
        c.fs.as_secs_f64(),
        c.channel.as_secs_f64()
    );
    row.ceiling = Some(c);
    for i in 0..runs {
        for tool in order(i) {
            bench.reset(tool);
            let s = bench.run(tool, src);
            log_sample(id, i, tool, &s);
            row.push(tool, s);
        }
    }
    row
}

/// A first backup of `src` by each tool, into an emptied store, for a
/// workload `id` that starts from it (not counted).
fn untimed_backup(bench: &mut Bench, id: &str, src: &Path) {
    for tool in order(0) {
        bench.reset(tool);
        let s = bench.run(tool, src);
        log_sample(&format!("{id} (first backup, not counted)"), 0, tool, &s);
    }
}

/// A restore of what each tool's last backup took, `runs` times (see
/// [`Bench::restore`]); `bytes`: the data restored.
fn restore(bench: &mut Bench, id: &str, desc: &str, runs: usize, bytes: u64) -> Row {
    let mut row = Row::new(id, desc, bytes);
    for i in 0..runs {
        for tool in order(i) {
            let s = bench.restore(tool);
            log_sample(id, i, tool, &s);
            row.push(tool, s);
        }
    }
    row
}

/// A backup into the existing store, `runs` times; `change(i)` edits the
/// source before repeat `i` (both tools then see the same edit).
fn repeat(
    bench: &mut Bench,
    id: &str,
    desc: &str,
    src: &Path,
    runs: usize,
    bytes: u64,
    mut change: impl FnMut(usize),
) -> Row {
    let mut row = Row::new(id, desc, bytes);
    for i in 0..runs {
        change(i);
        for tool in order(i) {
            let s = bench.run(tool, src);
            log_sample(id, i, tool, &s);
            row.push(tool, s);
        }
    }
    row
}

/// For the shared sshd fixture (`tests/integration/util/sshd.rs`): runs, panics on failure.
fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// For the shared sshd fixture: runs, whatever the exit status.
fn run_status(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Starts a loopback sshd with an account for the SSH rows: byteback's key
/// runs the wrapped byteback-server for the bench store, rsync's key runs
/// the wrapped `rsync --server` it asks for. Both log in as the same
/// unprivileged account, as byteback 1.x clients did.
fn ssh_setup(mount: &Path, bin_dir: &Path) -> (sshd::Sshd, SshSetup) {
    let dir = mount.join("ssh");
    let sshd = sshd::Sshd::start(&dir, &mount.join("ssh-home"));
    let bb_key = dir.join("bb_key");
    let rs_key = dir.join("rs_key");
    sshd::keygen(&bb_key);
    sshd::keygen(&rs_key);
    let stats_dir = mount.join("ssh-stats");
    std::fs::create_dir_all(&stats_dir).expect("mkdir stats");
    run(Command::new("chown")
        .arg(format!("{}:", sshd.user))
        .arg(&stats_dir));
    let harness = std::env::current_exe().expect("current_exe");
    let server = bin_dir.join("byteback-server");
    let store = mount.join("bb");
    let public = |k: &Path| {
        std::fs::read_to_string(k.with_extension("pub"))
            .expect("public key")
            .trim()
            .to_string()
    };
    let keys = format!(
        "restrict,command=\"{h} --wrap {s}/server-bb {server} serve --host {host} --store {store}\" {bb}\n\
         restrict,command=\"{h} --wrap {s}/server-rs sh -c \\\"$SSH_ORIGINAL_COMMAND\\\"\" {rs}\n",
        h = harness.display(),
        s = stats_dir.display(),
        server = server.display(),
        host = tools::HOST,
        store = store.display(),
        bb = public(&bb_key),
        rs = public(&rs_key),
    );
    std::fs::write(sshd.authorized_keys(), keys).expect("write authorized_keys");
    let config_dir = dir.join("client-config");
    std::fs::create_dir_all(&config_dir).expect("mkdir config");
    let host_pub = public(&dir.join("host_key"));
    let mut words = host_pub.split_whitespace();
    let (kind, blob) = (words.next().expect("type"), words.next().expect("blob"));
    std::fs::write(
        config_dir.join("known_hosts"),
        format!("[127.0.0.1]:{} {kind} {blob}\n", sshd.port),
    )
    .expect("write known_hosts");
    let setup = SshSetup {
        user: sshd.user.clone(),
        port: sshd.port,
        bb_key,
        rs_key,
        config_dir,
        stats_dir,
    };
    (sshd, setup)
}
