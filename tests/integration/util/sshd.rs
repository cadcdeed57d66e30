//! A real OpenSSH server on 127.0.0.1 for one test: its own config, host key,
//! log and an unprivileged account created for the test and deleted after it.
//!
//! Needs root (useradd, sshd). Call [`super::require_root`] first.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{run, run_status};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Serialises useradd, chpasswd and userdel within this process: the tests
/// of every area run concurrently here, and each of these tools locks
/// /etc/passwd and /etc/shadow, giving up ("cannot lock /etc/passwd") when
/// another holds the lock too long.
static ACCOUNTS: Mutex<()> = Mutex::new(());

fn accounts_lock() -> MutexGuard<'static, ()> {
    ACCOUNTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Password set on every test account (for the password set-up path).
pub const PASSWORD: &str = "byteback-test-pw";

/// A running sshd and the account it lets in.
pub struct Sshd {
    /// Directory holding the config, host key, admin key and log.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The account's name.
    pub user: String,
    /// The account's home directory (the byteback store).
    pub home: PathBuf,
    /// An unrestricted key for the account (what an admin logs in with).
    pub admin_key: PathBuf,
    /// Host keys beyond `dir/host_key` (see [`Sshd::restart_with_second_host_key`]).
    extra_host_keys: Vec<PathBuf>,
    /// `HostKeyAlgorithms` for sshd_config, if restricted.
    host_key_algorithms: Option<String>,
    child: Option<Child>,
}

/// Creates an ed25519 key pair with ssh-keygen.
pub fn keygen(path: &Path) {
    keygen_type(path, "ed25519");
}

/// Creates a key pair of type `kind` (`ssh-keygen -t`) with ssh-keygen.
pub fn keygen_type(path: &Path, kind: &str) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "byteback-test", "-f"])
        .arg(path));
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind a port");
    l.local_addr().unwrap().port()
}

impl Sshd {
    /// Creates an account whose home is `home` (made if missing, chowned to
    /// it), authorizes [`Sshd::admin_key`] for it, and starts sshd.
    pub fn start(dir: &Path, home: &Path) -> Sshd {
        fs::create_dir_all(dir).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(home).unwrap();
        // Every ancestor must be traversable by the account.
        let mut p = home.to_path_buf();
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() || parent == Path::new("/") {
                break;
            }
            let mode = fs::metadata(parent).unwrap().permissions().mode();
            if mode & 0o001 == 0 {
                fs::set_permissions(parent, fs::Permissions::from_mode(mode | 0o055)).unwrap();
            }
            p = parent.to_path_buf();
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let user = format!("bbt{}x{n}", std::process::id());
        let accounts = accounts_lock();
        let _ = run_status(Command::new("userdel").arg("-f").arg(&user));
        run(Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", "-d"])
            .arg(home)
            .arg(&user));
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("chpasswd");
        use std::io::Write;
        chpasswd
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{user}:{PASSWORD}\n").as_bytes())
            .unwrap();
        assert!(chpasswd.wait().unwrap().success(), "chpasswd failed");
        drop(accounts);
        run(Command::new("chown").arg(format!("{user}:")).arg(home));

        let ssh_dir = home.join(".ssh");
        fs::create_dir_all(&ssh_dir).unwrap();
        let admin_key = dir.join("admin_key");
        keygen(&admin_key);
        fs::copy(
            admin_key.with_extension("pub"),
            ssh_dir.join("authorized_keys"),
        )
        .unwrap();
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(&ssh_dir));
        fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700)).unwrap();

        keygen(&dir.join("host_key"));
        fs::create_dir_all("/run/sshd").unwrap();
        let mut sshd = Sshd {
            dir: dir.to_path_buf(),
            port: 0,
            user,
            home: home.to_path_buf(),
            admin_key,
            extra_host_keys: vec![],
            host_key_algorithms: None,
            child: None,
        };
        sshd.launch();
        sshd
    }

    fn config(&self) -> String {
        let mut extra = String::new();
        for k in &self.extra_host_keys {
            extra.push_str(&format!("HostKey {}\n", k.display()));
        }
        if let Some(algs) = &self.host_key_algorithms {
            extra.push_str(&format!("HostKeyAlgorithms {algs}\n"));
        }
        format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/host_key\n\
             {extra}\
             PidFile {dir}/sshd.pid\n\
             UsePAM no\n\
             PasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             AuthorizedKeysFile .ssh/authorized_keys\n\
             StrictModes yes\n\
             PermitRootLogin no\n\
             PermitUserEnvironment no\n\
             AllowUsers {user}\n\
             AllowTcpForwarding yes\n\
             MaxStartups 50\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\n\
             LogLevel VERBOSE\n",
            port = self.port,
            dir = self.dir.display(),
            user = self.user
        )
    }

    fn launch(&mut self) {
        for _ in 0..5 {
            self.port = free_port();
            let cfg = self.dir.join("sshd_config");
            fs::write(&cfg, self.config()).unwrap();
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("sshd.log"))
                .unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("cannot start /usr/sbin/sshd (is openssh-server installed?)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(st) = child.try_wait().unwrap() {
                    eprintln!("sshd exited early with {st}; log:\n{}", self.log());
                    break;
                }
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sshd did not start; log:\n{}", self.log());
    }

    /// Stops sshd (sessions it started go on).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Replaces the host key and restarts on the same port.
    pub fn restart_with_new_host_key(&mut self) {
        self.stop();
        keygen(&self.dir.join("host_key"));
        self.relaunch();
    }

    /// Gives sshd a second host key, of type `kind` (`ssh-keygen -t`), beside
    /// the first (ed25519) one, and restarts on the same port. With
    /// `only_algorithm`, sshd offers only that host key algorithm
    /// (`HostKeyAlgorithms`), so a client sees the new key; without, it offers
    /// both and the client picks. Returns the new key's `.pub` file.
    pub fn restart_with_second_host_key(
        &mut self,
        kind: &str,
        only_algorithm: Option<&str>,
    ) -> PathBuf {
        self.stop();
        let key = self.dir.join(format!("host_key_{kind}"));
        if !key.exists() {
            keygen_type(&key, kind);
        }
        if !self.extra_host_keys.contains(&key) {
            self.extra_host_keys.push(key.clone());
        }
        self.host_key_algorithms = only_algorithm.map(str::to_string);
        self.relaunch();
        key.with_extension("pub")
    }

    /// The first host key's fingerprint, `SHA256:...`, as `ssh-keygen -lf`
    /// prints it (what an admin gives `byteback-setup-client --host-key`).
    pub fn host_key_fingerprint(&self) -> String {
        let out = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.dir.join("host_key.pub"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen -lf failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let fp = text.split_whitespace().nth(1).unwrap().to_string();
        assert!(fp.starts_with("SHA256:"), "{text}");
        fp
    }

    /// The public half of the first host key, `TYPE BASE64` (no comment).
    pub fn host_key_pub(&self) -> String {
        let text = fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        text.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Starts sshd again (after [`Sshd::stop`]) on the same port.
    fn relaunch(&mut self) {
        let port = self.port;
        let cfg = self.dir.join("sshd_config");
        fs::write(&cfg, self.config()).unwrap();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("sshd.log"))
            .unwrap();
        let mut child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("sshd exited at restart with {st}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "sshd did not restart");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// `ssh://user@127.0.0.1:port/`.
    pub fn destination(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}/", self.user, self.port)
    }

    /// The sshd log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// The account's authorized_keys.
    pub fn authorized_keys(&self) -> PathBuf {
        self.home.join(".ssh/authorized_keys")
    }

    /// OpenSSH's client with `key`, host key checking off (the tests check
    /// byteback's own), batch mode; `args` follow the destination.
    pub fn openssh(&self, key: &Path, extra: &[&str], args: &[&str]) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(["-p", &self.port.to_string(), "-i"])
            .arg(key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=10",
            ])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("openssh_known_hosts").display()
            ))
            .args(extra)
            .arg(format!("{}@127.0.0.1", self.user))
            .args(args)
            .stdin(Stdio::null());
        run_status(&mut cmd)
    }

    /// Processes of the account matching `pattern` (pgrep -f).
    pub fn pids(&self, pattern: &str) -> Vec<u32> {
        let out = run_status(Command::new("pgrep").args(["-u", &self.user, "-f", pattern]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        let _ = run_status(Command::new("pkill").args(["-9", "-u", &self.user]));
        std::thread::sleep(Duration::from_millis(100));
        let _accounts = accounts_lock();
        let _ = run_status(Command::new("userdel").arg("-f").arg(&self.user));
    }
}
