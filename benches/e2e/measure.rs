//! Running a child and measuring it: wall time, CPU and peak RSS from
//! `wait4`, and the pipe relay that counts byteback's wire bytes and hands
//! the server's own rusage to the harness.
//!
//! The byteback client spawns its server as a child, so the client's rusage
//! would include the server's. The harness therefore points `BYTEBACK_SERVER`
//! at itself: in relay mode it starts the real server, splices both ways
//! (counting bytes, no copy through user space) and exits with the server's
//! status *without reaping it*. The server's zombie is then re-parented to the
//! harness (a child subreaper), which reaps it with `wait4` and so gets the
//! server's rusage alone, while the client's covers the client and the relay.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Resource usage of one process (tree), as `wait4` reports it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub user: Duration,
    pub sys: Duration,
    /// Peak resident set in KiB: for a process tree, the largest of any
    /// process in it (Linux `ru_maxrss` of waited-for children).
    pub maxrss_kib: u64,
}

impl Usage {
    pub fn cpu(&self) -> Duration {
        self.user + self.sys
    }

    fn from_rusage(r: &libc::rusage) -> Usage {
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Usage {
            user: tv(r.ru_utime),
            sys: tv(r.ru_stime),
            maxrss_kib: r.ru_maxrss as u64,
        }
    }
}

/// A finished, measured child.
pub struct Finished {
    pub wall: Duration,
    pub usage: Usage,
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    pub fn describe(&self, cmd: &Command) -> String {
        format!(
            "command: {cmd:?}\nwait status: {:#x}\n--- stdout ---\n{}\n--- stderr ---\n{}--- end ---",
            self.status,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// `wait4(pid)`: blocks until the child exits, retrying on EINTR.
pub fn wait4(pid: i32) -> io::Result<(i32, Usage)> {
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain old data, zeroed is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointers for status and rusage.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, Usage::from_rusage(&ru)));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Runs `cmd` (stdin null, stdout and stderr captured) and measures it.
/// Panics when it cannot be started.
pub fn run_measured(cmd: &mut Command) -> Finished {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let t_out = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = err.read_to_end(&mut v);
        v
    });
    let (status, usage) =
        wait4(child.id() as i32).unwrap_or_else(|e| panic!("wait4 for {cmd:?}: {e}"));
    let wall = start.elapsed();
    // `child` was reaped by hand; dropping a std Child never waits.
    drop(child);
    Finished {
        wall,
        usage,
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` unmeasured and panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (is the tool installed?)"));
    if !out.status.success() {
        panic!(
            "command failed: {cmd:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.stdout
}

/// Makes this process the reaper of its orphaned descendants (see the module doc).
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        panic!("PR_SET_CHILD_SUBREAPER: {}", io::Error::last_os_error());
    }
}

/// Busy time of all CPUs since boot, from the `cpu` line of `/proc/stat`
/// (user, nice, system, irq, softirq and steal; guest time is within user):
/// what every process and kernel thread used, in clock ticks turned into
/// time. The difference over a run is the machine's CPU for it, the work
/// of kernel threads included (writeback, the loop device's copies), which
/// no process's rusage holds.
pub fn machine_busy() -> Duration {
    let stat =
        fs::read_to_string("/proc/stat").unwrap_or_else(|e| panic!("cannot read /proc/stat: {e}"));
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .unwrap_or_else(|| panic!("/proc/stat has no cpu line"));
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| {
            x.parse()
                .unwrap_or_else(|_| panic!("bad /proc/stat field {x:?}"))
        })
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum::<u64>();
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    // In u128: a large machine's ticks since boot overflow u64 nanoseconds.
    let nanos = u128::from(busy) * 1_000_000_000 / u128::from(hz);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Writes dirty data out and empties the page cache, so every timed run
/// starts cold. Needs root.
pub fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n")
        .unwrap_or_else(|e| panic!("cannot drop caches (root needed): {e}"));
}

// ---------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------

/// Environment variable naming the real server; its presence selects relay mode.
pub const RELAY_SERVER_ENV: &str = "BYTEBACK_BENCH_RELAY_SERVER";
/// Where the relay writes `client_to_server server_to_client server_pid`.
pub const RELAY_STATS_ENV: &str = "BYTEBACK_BENCH_RELAY_STATS";

/// What the relay recorded for one byteback run.
pub struct RelayStats {
    pub to_server: u64,
    pub to_client: u64,
    pub server_pid: i32,
}

/// The environment that makes a byteback client run its server through the relay.
pub fn relay_env(harness: &Path, real_server: &Path, stats: &Path) -> Vec<(OsString, OsString)> {
    vec![
        ("BYTEBACK_SERVER".into(), harness.as_os_str().to_owned()),
        (RELAY_SERVER_ENV.into(), real_server.as_os_str().to_owned()),
        (RELAY_STATS_ENV.into(), stats.as_os_str().to_owned()),
    ]
}

/// Reads what the relay wrote; panics when it is missing (the relay never ran).
pub fn read_relay_stats(path: &Path) -> RelayStats {
    let s = fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "relay stats {} missing ({e}): did the client start the relay?",
            path.display()
        )
    });
    let v: Vec<i64> = s
        .split_whitespace()
        .map(|x| x.parse().expect("relay stats are numbers"))
        .collect();
    assert_eq!(v.len(), 3, "relay stats {s:?}");
    RelayStats {
        to_server: v[0] as u64,
        to_client: v[1] as u64,
        server_pid: v[2] as i32,
    }
}

/// Relay mode: run the real server with our arguments, splice stdin/stdout
/// through, write the byte counts and exit with the server's status, leaving
/// its zombie for the harness. Never returns.
pub fn relay_main(real_server: PathBuf) -> ! {
    let stats_path = std::env::var_os(RELAY_STATS_ENV).map(PathBuf::from);
    let mut child = match Command::new(&real_server)
        .args(std::env::args_os().skip(1))
        .env_remove(RELAY_SERVER_ENV)
        .env_remove(RELAY_STATS_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench relay: cannot start {}: {e}", real_server.display());
            std::process::exit(1);
        }
    };
    let pid = child.id() as i32;
    let to_server = child.stdin.take().expect("stdin pipe");
    let from_server = child.stdout.take().expect("stdout pipe");
    let up = std::thread::spawn(move || {
        let n = pump(0, to_server.as_raw_fd());
        drop(to_server); // EOF for the server
        n
    });
    let down = pump(from_server.as_raw_fd(), 1);
    drop(from_server);
    let up = up.join().unwrap_or(0);
    // Wait for the exit without reaping (WNOWAIT): the zombie goes to the harness.
    // SAFETY: siginfo_t is plain old data, zeroed is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let code = loop {
        // SAFETY: valid out-pointer; pid is our child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // SAFETY: waitid succeeded for a child that exited, so si_status is set.
            let st = unsafe { info.si_status() };
            break if info.si_code == libc::CLD_EXITED {
                st
            } else {
                128 + st
            };
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break 1;
        }
    };
    if let Some(p) = stats_path {
        if let Err(e) = fs::write(&p, format!("{up} {down} {pid}\n")) {
            eprintln!("bench relay: cannot write {}: {e}", p.display());
        }
    }
    std::mem::forget(child);
    std::process::exit(code);
}

/// Moves bytes from `from` to `to` until EOF; returns how many. Uses splice
/// (the client's end is a socket, the server's are pipes), falling back to
/// read/write where splice is refused.
///
/// From a socket, splice holds the pipe's lock while it waits for data, so
/// the server could not read what is already in the pipe and both sides
/// would wait for ever: it only splices once the socket has data and the
/// pipe has room, without blocking.
fn pump(from: i32, to: i32) -> u64 {
    let from_socket = is_socket(from);
    let mut total = 0u64;
    loop {
        if from_socket && !(wait_for(from, libc::POLLIN) && wait_for(to, libc::POLLOUT)) {
            return total;
        }
        let flags = if from_socket {
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK
        } else {
            libc::SPLICE_F_MOVE
        };
        // SAFETY: plain fds, null offsets (pipes and sockets).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                1 << 20,
                flags,
            )
        };
        if n > 0 {
            total += n as u64;
            continue;
        }
        if n == 0 {
            return total;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if from_socket => continue,
            Some(libc::EINVAL) => return total + copy_fallback(from, to),
            _ => return total, // the peer went away: the server or client reports it
        }
    }
}

fn is_socket(fd: i32) -> bool {
    // SAFETY: fstat into a zeroed stat buffer on a plain fd.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

/// Waits until `fd` is ready for `events` (or hung up: the next splice says
/// how); false on a poll error.
fn wait_for(fd: i32, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r >= 0 {
            return true;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

fn copy_fallback(from: i32, to: i32) -> u64 {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return total;
        }
        let mut off = 0usize;
        while off < n as usize {
            // SAFETY: buf[off..n] is initialised.
            let w = unsafe { libc::write(to, buf[off..].as_ptr().cast(), n as usize - off) };
            if w < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if w <= 0 {
                return total;
            }
            off += w as usize;
        }
        total += n as u64;
    }
}
