//! The two contenders and how they reach their store.
//!
//! Adding a transport (SSH) is one [`Transport`] variant plus its arms in
//! [`Transport::byteback_destination`] and [`Transport::rsync_args`]:
//! byteback then runs `byteback-backup --destination ssh://user@127.0.0.1:PORT/`
//! and rsync `rsync ... -e 'ssh -p PORT -i KEY ...' user@127.0.0.1:DIR`. Over
//! SSH the server side runs under sshd, so its rusage is not ours to reap:
//! point the forced command at this harness's relay (`BYTEBACK_BENCH_RELAY_*`)
//! or leave `server` empty; wire bytes then come from the relay or from the
//! client's own report.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::btrfs::LoopFs;
use crate::measure::{self, read_relay_stats, relay_env, run_measured, Finished, Usage};

/// How the backup reaches its store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Same machine: byteback spawns its server over pipes, rsync forks its receiver.
    Local,
    /// A loopback sshd; both tools log in as the same unprivileged account,
    /// whose forced commands wrap each server side to record its rusage.
    Ssh(SshSetup),
}

/// Everything the SSH transport needs (see `main::ssh_setup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshSetup {
    pub user: String,
    pub port: u16,
    /// byteback's client key (forced command: the wrapped byteback-server).
    pub bb_key: PathBuf,
    /// rsync's key (forced command: the wrapped `$SSH_ORIGINAL_COMMAND`).
    pub rs_key: PathBuf,
    /// BYTEBACK_CONFIG_DIR for the client: holds known_hosts.
    pub config_dir: PathBuf,
    /// Where the wrapped server sides write `cpu_ns maxrss_kib`.
    pub stats_dir: PathBuf,
}

/// The cipher both tools use over SSH: AES-GCM, byteback's first choice
/// and OpenSSH's fastest with AES-NI (its default is chacha20-poly1305).
pub const SSH_CIPHER: &str = "aes128-gcm@openssh.com";

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Local => "local",
            Transport::Ssh(_) => "ssh",
        }
    }

    /// `--destination` for byteback-backup.
    pub fn byteback_destination(&self, store: &Path) -> OsString {
        match self {
            Transport::Local => store.as_os_str().to_owned(),
            Transport::Ssh(s) => format!("ssh://{}@127.0.0.1:{}/", s.user, s.port).into(),
        }
    }

    /// Extra rsync arguments and the target argument for `dest`.
    ///
    /// Local rsync defaults to `--whole-file`; byteback 1.x ran rsync over
    /// SSH, where the delta algorithm is on, so the local baseline turns it
    /// back on with `--no-whole-file` (over SSH it is the default).
    pub fn rsync_args(&self, dest: &Path) -> (Vec<OsString>, OsString) {
        let (mut extra, t) = self.rsync_remote(dest);
        if *self == Transport::Local {
            extra.push("--no-whole-file".into());
        }
        (extra, t)
    }

    /// Extra rsync arguments and the argument that names the directory
    /// `dir` of the store's side (`dir/`, or `user@127.0.0.1:dir/`).
    fn rsync_remote(&self, dir: &Path) -> (Vec<OsString>, OsString) {
        match self {
            Transport::Local => {
                let mut t = dir.as_os_str().to_owned();
                t.push("/");
                (vec![], t)
            }
            Transport::Ssh(s) => {
                let mut t = OsString::from(format!("{}@127.0.0.1:", s.user));
                t.push(dir.as_os_str());
                t.push("/");
                let e = format!(
                    "ssh -p {} -i {} -c {SSH_CIPHER} -o BatchMode=yes -o IdentitiesOnly=yes \
                     -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                    s.port,
                    s.rs_key.display()
                );
                (vec!["-e".into(), e.into()], t)
            }
        }
    }

    /// Gives the SSH account a freshly made store directory.
    fn own(&self, dir: &Path) {
        if let Transport::Ssh(s) = self {
            measure::run(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{}:", s.user))
                    .arg(dir),
            );
        }
    }

    /// Removes what a wrapped server side recorded, if it did.
    fn drop_server_usage(&self, name: &str) {
        if let Transport::Ssh(s) = self {
            let _ = fs::remove_file(s.stats_dir.join(name));
        }
    }

    /// Reads (and removes) what a wrapped server side recorded.
    fn server_usage(&self, name: &str) -> Option<Usage> {
        let Transport::Ssh(s) = self else {
            return None;
        };
        let path = s.stats_dir.join(name);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no server stats at {}: {e}", path.display()));
        let _ = fs::remove_file(&path);
        let mut it = text
            .split_whitespace()
            .map(|w| w.parse::<u64>().expect("stats number"));
        let (cpu_ns, rss) = (it.next().expect("cpu"), it.next().expect("rss"));
        Some(Usage {
            user: Duration::from_nanos(cpu_ns),
            sys: Duration::ZERO,
            maxrss_kib: rss,
        })
    }
}

/// `e2e --wrap STATS CMD ARGS...`: the forced command of the SSH account.
/// Runs CMD with our stdio, then writes its CPU time and peak RSS to STATS.
pub fn wrap_main(args: &[OsString]) -> ! {
    let (Some(stats), Some(prog)) = (args.first(), args.get(1)) else {
        eprintln!("usage: e2e --wrap STATS CMD [ARGS...]");
        std::process::exit(2);
    };
    let child = Command::new(prog)
        .args(&args[2..])
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {prog:?}: {e}"));
    let (status, usage) = measure::wait4(child.id() as i32).expect("wait4");
    let _ = fs::write(
        stats,
        format!("{} {}\n", usage.cpu().as_nanos(), usage.maxrss_kib),
    );
    std::mem::forget(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code)
}

/// Which program ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Byteback,
    Rsync,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Byteback => "byteback",
            Tool::Rsync => "rsync",
        }
    }
}

/// One measured run of one tool.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub wall: Duration,
    /// CPU of every process of the tool (client, server, rsync's three).
    pub cpu: Duration,
    /// Peak RSS of the client side (byteback-backup; for rsync, the largest
    /// of its processes, which cannot be told apart from outside).
    pub client_rss_kib: u64,
    /// Peak RSS of byteback-server (None for rsync and remote servers).
    pub server_rss_kib: Option<u64>,
    pub client_cpu: Duration,
    pub server_cpu: Option<Duration>,
    /// Bytes over the wire, both directions.
    pub wire_bytes: u64,
    /// Growth of the tool's store on disc (qgroup referenced bytes).
    pub space_added: u64,
    /// Busy time of all CPUs during the run ([`measure::machine_busy`]):
    /// `cpu` plus the kernel threads' work the run caused (and whatever
    /// else ran, nothing on a quiet machine).
    pub machine_cpu: Duration,
}

impl Sample {
    /// Largest peak RSS of any process of the tool.
    pub fn max_rss_kib(&self) -> u64 {
        self.client_rss_kib.max(self.server_rss_kib.unwrap_or(0))
    }
}

/// Everything the harness needs to run either tool.
/// What the machine allows for a first backup (see [`Bench::ceilings`]).
#[derive(Clone, Copy, Debug)]
pub struct Ceiling {
    /// `cp -a` plus `sync` of the tree on the same filesystem.
    pub fs: Duration,
    /// The tree's bytes through the channel (pipe or ssh).
    pub channel: Duration,
}

impl Ceiling {
    /// The binding one: the larger of the two.
    pub fn wall(&self) -> Duration {
        self.fs.max(self.channel)
    }
}

pub struct Bench {
    pub fs: LoopFs,
    pub transport: Transport,
    pub bin_dir: PathBuf,
    pub harness: PathBuf,
    /// `<mnt>/bb`: byteback's store.
    pub bb_store: PathBuf,
    /// `<mnt>/rs`: rsync's target subvolume `current` and its snapshots.
    pub rs_dir: PathBuf,
    pub bb_known: std::collections::HashSet<u64>,
    pub rs_known: std::collections::HashSet<u64>,
    pub rs_snapshots: u64,
    pub verbose: bool,
}

pub const HOST: &str = "bench";
const BB_GROUP: &str = "1/1";
const RS_GROUP: &str = "1/2";

impl Bench {
    pub fn new(fs: LoopFs, transport: Transport, bin_dir: PathBuf, verbose: bool) -> Bench {
        let bb_store = fs.mount.join("bb");
        let rs_dir = fs.mount.join("rs");
        fs.qgroup_create(BB_GROUP);
        fs.qgroup_create(RS_GROUP);
        let harness = std::env::current_exe().expect("current_exe");
        let b = Bench {
            fs,
            transport,
            bin_dir,
            harness,
            bb_store,
            rs_dir,
            bb_known: Default::default(),
            rs_known: Default::default(),
            rs_snapshots: 0,
            verbose,
        };
        b.reset(Tool::Byteback);
        b.reset(Tool::Rsync);
        b
    }

    /// The harness's own files, in a directory of their own: created or
    /// removed in the mount's root they would change the mtime of an
    /// ancestor of every source, which byteback stores (so a no-change
    /// run would rewrite its manifest because of the harness).
    fn scratch(&self) -> PathBuf {
        let dir = self.fs.mount.join("harness");
        fs::create_dir_all(&dir).expect("mkdir harness");
        dir
    }

    /// Empties a tool's store (before a first backup).
    pub fn reset(&self, tool: Tool) {
        match tool {
            Tool::Byteback => {
                self.fs.remove_tree(&self.bb_store);
                fs::create_dir_all(&self.bb_store).expect("mkdir store");
                // Every run takes a snapshot, as the rsync side does.
                fs::write(
                    self.bb_store.join("byteback.toml"),
                    "min_snapshot_interval = 0\n",
                )
                .expect("write byteback.toml");
                self.transport.own(&self.bb_store);
            }
            Tool::Rsync => {
                self.fs.remove_tree(&self.rs_dir);
                fs::create_dir_all(&self.rs_dir).expect("mkdir rs");
                self.fs.subvolume_create(&self.rs_dir.join("current"));
                self.transport.own(&self.rs_dir);
            }
        }
    }

    fn space_before(&mut self, tool: Tool) -> u64 {
        let (dir, group, known) = match tool {
            Tool::Byteback => (&self.bb_store, BB_GROUP, &mut self.bb_known),
            Tool::Rsync => (&self.rs_dir, RS_GROUP, &mut self.rs_known),
        };
        self.fs.qgroup_adopt(dir, group, known);
        self.fs.qgroup_referenced(group)
    }

    /// Backs up `src` with `tool`; panics loudly when the tool fails.
    pub fn run(&mut self, tool: Tool, src: &Path) -> Sample {
        let before = self.space_before(tool);
        measure::drop_caches();
        let busy = measure::machine_busy();
        let mut s = match tool {
            Tool::Byteback => self.run_byteback(src),
            Tool::Rsync => self.run_rsync(src),
        };
        s.machine_cpu = measure::machine_busy().saturating_sub(busy);
        let after = self.space_before(tool);
        s.space_added = after.saturating_sub(before);
        s
    }

    fn run_byteback(&mut self, src: &Path) -> Sample {
        let mut cmd = Command::new(self.bin_dir.join("byteback-backup"));
        cmd.arg("--destination")
            .arg(self.transport.byteback_destination(&self.bb_store))
            .arg("--source")
            .arg(src)
            .args(["--hostname", HOST, "--retry-number", "0"]);
        self.measure_byteback(cmd)
    }

    /// Restores everything the latest backup took, from a cold cache, into
    /// an emptied directory on the same filesystem (removed afterwards,
    /// untimed): byteback with `byteback-restore --restore /`, rsync by
    /// pulling its latest snapshot with `rsync -a --xattrs --numeric-ids`
    /// (over SSH through the same account). Neither syncs at the end. Panics
    /// loudly when the tool fails.
    pub fn restore(&mut self, tool: Tool) -> Sample {
        let into = self.scratch().join("restored");
        self.fs.remove_tree(&into);
        fs::create_dir_all(&into).expect("mkdir restored");
        measure::drop_caches();
        let busy = measure::machine_busy();
        let mut s = match tool {
            Tool::Byteback => {
                let mut cmd = Command::new(self.bin_dir.join("byteback-restore"));
                cmd.arg("--destination")
                    .arg(self.transport.byteback_destination(&self.bb_store))
                    .args(["--hostname", HOST, "--restore", "--no-progress", "--target"])
                    .arg(&into)
                    .arg("/");
                self.measure_byteback(cmd)
            }
            Tool::Rsync => self.restore_rsync(&into),
        };
        s.machine_cpu = measure::machine_busy().saturating_sub(busy);
        self.fs.remove_tree(&into);
        s
    }

    /// Runs a byteback client (`cmd`, without transport options) against
    /// the bench store and measures it with its server.
    fn measure_byteback(&mut self, mut cmd: Command) -> Sample {
        let stats = self.scratch().join("relay-stats");
        let _ = fs::remove_file(&stats);
        let prog = cmd.get_program().to_string_lossy().into_owned();
        if let Transport::Ssh(s) = &self.transport {
            cmd.arg("--ssh-key")
                .arg(&s.bb_key)
                .env("BYTEBACK_CONFIG_DIR", &s.config_dir);
            let done = run_measured(&mut cmd);
            if !done.success() {
                panic!("{prog} failed:\n{}", done.describe(&cmd));
            }
            let server = self
                .transport
                .server_usage("server-bb")
                .expect("server stats");
            let err = String::from_utf8_lossy(&done.stderr);
            if self.verbose {
                eprint!("{err}");
            }
            let wire = err
                .lines()
                .find(|l| l.contains(" received over SSH"))
                .and_then(|l| {
                    // The summary line ends "; A bytes sent and B received over SSH ...".
                    let tail = l.rsplit("; ").next()?;
                    let n: Vec<u64> = tail
                        .split_whitespace()
                        .filter_map(|w| w.parse().ok())
                        .collect();
                    (n.len() == 2).then(|| n[0] + n[1])
                })
                .unwrap_or_else(|| {
                    // An older byteback-restore (through --bin-dir) did not count them.
                    assert!(
                        prog.ends_with("byteback-restore"),
                        "no SSH byte counts in {prog}'s report:\n{err}"
                    );
                    eprintln!(
                        "e2e: WARNING: no SSH byte counts in {prog}'s report: wire shown as 0"
                    );
                    0
                });
            return Sample {
                wall: done.wall,
                cpu: done.usage.cpu() + server.cpu(),
                client_rss_kib: done.usage.maxrss_kib,
                server_rss_kib: Some(server.maxrss_kib),
                client_cpu: done.usage.cpu(),
                server_cpu: Some(server.cpu()),
                wire_bytes: wire,
                space_added: 0,
                machine_cpu: Duration::ZERO,
            };
        }
        for (k, v) in relay_env(&self.harness, &self.bin_dir.join("byteback-server"), &stats) {
            cmd.env(k, v);
        }
        let done = run_measured(&mut cmd);
        // Reap the server (re-parented to us) whatever happened, for its rusage.
        let relay = stats.exists().then(|| read_relay_stats(&stats));
        let server: Option<Usage> = relay
            .as_ref()
            .and_then(|r| measure::wait4(r.server_pid).ok().map(|(_, u)| u));
        if !done.success() {
            panic!("{prog} failed:\n{}", done.describe(&cmd));
        }
        if self.verbose {
            eprint!("{}", String::from_utf8_lossy(&done.stderr));
        }
        let relay = relay.expect("relay stats");
        let server = server.expect("server rusage");
        Sample {
            wall: done.wall,
            cpu: done.usage.cpu() + server.cpu(),
            client_rss_kib: done.usage.maxrss_kib,
            server_rss_kib: Some(server.maxrss_kib),
            client_cpu: done.usage.cpu(),
            server_cpu: Some(server.cpu()),
            wire_bytes: relay.to_server + relay.to_client,
            space_added: 0,
            machine_cpu: Duration::ZERO,
        }
    }

    /// The machine's ceilings for a first backup of `src`, each timed once
    /// from a cold cache: the filesystem's (`cp -a` of the tree into the
    /// same filesystem, without reflinks, then `sync`) and the channel's
    /// (the tree's bytes as a tar stream through what carries the backup:
    /// a pipe, or `ssh` with the same cipher into `cat >/dev/null`).
    pub fn ceilings(&mut self, src: &Path) -> Ceiling {
        let dest = self.scratch().join("ceiling");
        self.fs.remove_tree(&dest);
        measure::drop_caches();
        let mut cp = Command::new("sh");
        cp.arg("-c")
            .arg("cp -a --reflink=never \"$1\" \"$2\" && sync")
            .arg("sh")
            .arg(src)
            .arg(&dest);
        let copied = run_measured(&mut cp);
        if !copied.success() {
            panic!("cp -a failed:\n{}", copied.describe(&cp));
        }
        self.fs.remove_tree(&dest);
        let sink = match &self.transport {
            Transport::Local => "cat >/dev/null".to_string(),
            Transport::Ssh(s) => format!(
                "ssh -p {} -i {} -c {SSH_CIPHER} -o BatchMode=yes -o IdentitiesOnly=yes \
                 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
                 {}@127.0.0.1 'cat >/dev/null'",
                s.port,
                s.rs_key.display(),
                s.user
            ),
        };
        measure::drop_caches();
        let mut tar = Command::new("bash");
        tar.arg("-o")
            .arg("pipefail")
            .arg("-c")
            .arg(format!("tar -C \"$1\" -cf - . | {sink}"))
            .arg("bash")
            .arg(src);
        let sent = run_measured(&mut tar);
        if !sent.success() {
            panic!("tar | channel failed:\n{}", sent.describe(&tar));
        }
        // The wrapped forced command left its stats: not needed here.
        self.transport.drop_server_usage("server-rs");
        Ceiling {
            fs: copied.wall,
            channel: sent.wall,
        }
    }

    /// rsync as byteback 1.x ran it, then the read-only snapshot 1.x took
    /// after it (timed too: creating it flushes the new data, as byteback's
    /// commit does with syncfs).
    fn run_rsync(&mut self, src: &Path) -> Sample {
        let current = self.rs_dir.join("current");
        let (extra, target) = self.transport.rsync_args(&current);
        let mut source = src.as_os_str().to_owned();
        source.push("/");
        let mut cmd = Command::new("rsync");
        cmd.args([
            "-a",
            "--xattrs",
            "--numeric-ids",
            "--delete",
            "--inplace",
            "--stats",
        ])
        .args(extra)
        .arg(source)
        .arg(target);
        let done = run_measured(&mut cmd);
        if !done.success() {
            panic!("rsync failed:\n{}", done.describe(&cmd));
        }
        self.rs_snapshots += 1;
        let snap = self.rs_dir.join(format!("snap-{:04}", self.rs_snapshots));
        let mut snap_cmd = Command::new("btrfs");
        snap_cmd
            .args(["-q", "subvolume", "snapshot", "-r"])
            .arg(&current)
            .arg(&snap);
        let snapped = run_measured(&mut snap_cmd);
        if !snapped.success() {
            panic!("snapshot failed:\n{}", snapped.describe(&snap_cmd));
        }
        let mut s = self.rsync_sample(&done);
        s.wall += snapped.wall;
        s.cpu += snapped.usage.cpu();
        s
    }

    /// What an rsync run `done` measured, its server side included; its
    /// bytes on the wire from `--stats`.
    fn rsync_sample(&self, done: &Finished) -> Sample {
        let text = String::from_utf8_lossy(&done.stdout);
        let wire =
            stat_number(&text, "Total bytes sent:") + stat_number(&text, "Total bytes received:");
        let server = self.transport.server_usage("server-rs");
        Sample {
            wall: done.wall,
            cpu: done.usage.cpu() + server.map(|u| u.cpu()).unwrap_or_default(),
            client_rss_kib: done.usage.maxrss_kib,
            server_rss_kib: server.map(|u| u.maxrss_kib),
            client_cpu: done.usage.cpu(),
            server_cpu: server.map(|u| u.cpu()),
            wire_bytes: wire,
            space_added: 0,
            machine_cpu: Duration::ZERO,
        }
    }

    /// rsync pulling its latest snapshot into `into` (see [`Bench::restore`]).
    fn restore_rsync(&mut self, into: &Path) -> Sample {
        let snap = self.rs_dir.join(format!("snap-{:04}", self.rs_snapshots));
        let (extra, source) = self.transport.rsync_remote(&snap);
        let mut target = into.as_os_str().to_owned();
        target.push("/");
        let mut cmd = Command::new("rsync");
        cmd.args(["-a", "--xattrs", "--numeric-ids", "--stats"])
            .args(extra)
            .arg(source)
            .arg(target);
        let done = run_measured(&mut cmd);
        if !done.success() {
            panic!("rsync failed:\n{}", done.describe(&cmd));
        }
        self.rsync_sample(&done)
    }
}

/// A number from rsync's `--stats` ("Total bytes sent: 1,234").
fn stat_number(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("rsync --stats output has no {label:?}:\n{text}"));
    let digits: String = line[label.len()..]
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("cannot read a number from {line:?}"))
}
