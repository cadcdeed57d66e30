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
use crate::measure::{self, read_relay_stats, relay_env, run_measured, Usage};

/// How the backup reaches its store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Same machine: byteback spawns its server over pipes, rsync forks its receiver.
    Local,
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Local => "local",
        }
    }

    /// `--destination` for byteback-backup.
    pub fn byteback_destination(&self, store: &Path) -> OsString {
        match self {
            Transport::Local => store.as_os_str().to_owned(),
        }
    }

    /// Extra rsync arguments and the target argument for `dest`.
    ///
    /// Local rsync defaults to `--whole-file`; byteback 1.x ran rsync over
    /// SSH, where the delta algorithm is on, so the local baseline turns it
    /// back on with `--no-whole-file` (over SSH it is the default).
    pub fn rsync_args(&self, dest: &Path) -> (Vec<OsString>, OsString) {
        match self {
            Transport::Local => {
                let mut t = dest.as_os_str().to_owned();
                t.push("/");
                (vec!["--no-whole-file".into()], t)
            }
        }
    }
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
}

impl Sample {
    /// Largest peak RSS of any process of the tool.
    pub fn max_rss_kib(&self) -> u64 {
        self.client_rss_kib.max(self.server_rss_kib.unwrap_or(0))
    }
}

/// Everything the harness needs to run either tool.
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
            }
            Tool::Rsync => {
                self.fs.remove_tree(&self.rs_dir);
                fs::create_dir_all(&self.rs_dir).expect("mkdir rs");
                self.fs.subvolume_create(&self.rs_dir.join("current"));
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
        let mut s = match tool {
            Tool::Byteback => self.run_byteback(src),
            Tool::Rsync => self.run_rsync(src),
        };
        let after = self.space_before(tool);
        s.space_added = after.saturating_sub(before);
        s
    }

    fn run_byteback(&mut self, src: &Path) -> Sample {
        let stats = self.fs.mount.join("relay-stats");
        let _ = fs::remove_file(&stats);
        let mut cmd = Command::new(self.bin_dir.join("byteback-backup"));
        cmd.arg("--destination")
            .arg(self.transport.byteback_destination(&self.bb_store))
            .arg("--source")
            .arg(src)
            .args(["--hostname", HOST, "--retry-number", "0"]);
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
            panic!("byteback-backup failed:\n{}", done.describe(&cmd));
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
        let text = String::from_utf8_lossy(&done.stdout);
        let wire =
            stat_number(&text, "Total bytes sent:") + stat_number(&text, "Total bytes received:");
        Sample {
            wall: done.wall + snapped.wall,
            cpu: done.usage.cpu() + snapped.usage.cpu(),
            client_rss_kib: done.usage.maxrss_kib,
            server_rss_kib: None,
            client_cpu: done.usage.cpu(),
            server_cpu: None,
            wire_bytes: wire,
            space_added: 0,
        }
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
