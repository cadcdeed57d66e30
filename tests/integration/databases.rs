//! Consistent database dumps through the shipped pre-backup hooks
//! (`packaging/hooks/pre-backup.d/50-mysql` and `50-postgresql`), against
//! REAL servers.
//!
//! Each test starts its own server in a temporary directory on a private
//! socket (no TCP), fills a bank whose accounts hold a known total, and
//! starts a writer that keeps moving money between accounts in transactions
//! (debit first, then credit, then a transfer counter). While the writer
//! runs, the real `byteback-backup` backs up a source directory into a local
//! store, with `BYTEBACK_CONFIG_DIR` pointing at a config dir whose
//! `pre-backup.d` holds the shipped hook, configured (environment) for the
//! private server and a dump directory inside the source. Then the writer
//! stops, `byteback-restore` restores the dump, a FRESH server loads it, and
//! the total must be unchanged: a dump that is not one snapshot would catch
//! some transfers half done.
//!
//! Needs root (PostgreSQL runs as the postgres user) and the servers
//! (`scripts/test.sh` installs mariadb-server and postgresql); without them
//! the tests are skipped loudly, and fail when `CI` is set. Every server and
//! writer is killed by a Drop guard, also when a test panics.

use crate::util;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use util::*;

/// Accounts per table; each starts with [`START_BALANCE`].
const ACCOUNTS: u64 = 2000;
const START_BALANCE: u64 = 500;
/// Rows of filler dumped between the tables money moves between, so the
/// dump takes a while and the writer commits many transfers meanwhile.
const BULK_ROWS: u64 = 50_000;
/// Transfers the writer must have committed before the backup starts.
const WARM_UP: u64 = 20;

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

/// `name` in $PATH, /usr/sbin or /sbin.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
fn postgres_bindir() -> Option<PathBuf> {
    let mut v: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let ver: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((ver, bin))
        })
        .collect();
    v.sort();
    v.pop().map(|(_, b)| b)
}

/// Whether the test can run: root, and every tool in `missing` found (the
/// list names what is not). Panics under CI instead of skipping.
fn can_run(what: &str, missing: &[String]) -> bool {
    if !require_root(what) {
        return false;
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{what} needs {} (scripts/test.sh installs mariadb-server and postgresql)",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}, and CI is set");
    }
    let _ = writeln!(std::io::stderr(), "\n******** SKIPPED: {msg} ********\n");
    false
}

fn need(tools: &[&str]) -> (Vec<PathBuf>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for t in tools {
        match find_tool(t) {
            Some(p) => found.push(p),
            None => missing.push(t.to_string()),
        }
    }
    (found, missing)
}

/// A temporary directory in /tmp: short socket paths whatever the checkout's
/// path, and reachable by the postgres user.
fn short_tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------

/// A server process, stopped with `stop_signal` (then SIGKILL) on drop.
struct Server {
    child: Child,
    stop_signal: Signal,
    log: PathBuf,
}

impl Server {
    /// Waits until `ready` succeeds; panics with the server's log when it
    /// exits or a minute passes.
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{what} exited ({status}) before it was ready; its log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "{what} not ready after 60 s; its log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        send_signal(self.child.id(), self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client process fed transfers on its stdin by a thread until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    thread: Option<JoinHandle<Result<u64, String>>>,
}

impl Writer {
    fn start(
        mut client: Command,
        log: PathBuf,
        mut transfer: impl FnMut(&mut Rng) -> String + Send + 'static,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(0));
        let (stop2, pid2) = (stop.clone(), pid.clone());
        client
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let thread = std::thread::spawn(move || {
            let mut child = client.spawn().map_err(|e| format!("{client:?}: {e}"))?;
            pid2.store(child.id(), Ordering::SeqCst);
            let mut stdin = child.stdin.take().unwrap();
            let mut rng = Rng::new(42);
            let mut sent = 0u64;
            let mut broken = None;
            while !stop2.load(Ordering::SeqCst) {
                if let Err(e) = stdin.write_all(transfer(&mut rng).as_bytes()) {
                    broken = Some(e);
                    break;
                }
                sent += 1;
            }
            drop(stdin);
            let status = child.wait().map_err(|e| e.to_string())?;
            let log = fs::read_to_string(&log).unwrap_or_default();
            match broken {
                Some(e) => Err(format!("writer's client stopped ({e}, {status}): {log}")),
                None if !status.success() => {
                    Err(format!("writer's client failed ({status}): {log}"))
                }
                None => Ok(sent),
            }
        });
        Writer {
            stop,
            pid,
            thread: Some(thread),
        }
    }

    /// Stops sending, lets the client finish what it was sent; panics if it failed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().unwrap();
        t.join().unwrap().unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // A test that panicked: kill the client, do not wait for it.
            self.stop.store(true, Ordering::SeqCst);
            let pid = self.pid.load(Ordering::SeqCst);
            if pid != 0 {
                send_signal(pid, Signal::KILL);
            }
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The backed-up machine: config dir with the shipped hook, source, store
// ---------------------------------------------------------------------------

struct Site {
    _dir: tempfile::TempDir,
    work: PathBuf,
    conf: PathBuf,
    src: PathBuf,
    dumps: PathBuf,
    store: PathBuf,
}

impl Site {
    /// A site whose pre-backup.d holds the shipped `hooks` (copies, as an
    /// admin installs them).
    fn new(hooks: &[&str]) -> Site {
        let dir = scratch();
        let work = dir.path().to_path_buf();
        let conf = work.join("conf");
        let src = work.join("src");
        let dumps = src.join("var/backups/byteback");
        let store = work.join("store");
        fs::create_dir_all(conf.join("pre-backup.d")).unwrap();
        fs::create_dir_all(&src).unwrap();
        store_without_interval(&store);
        fs::write(src.join("motd"), b"a file beside the dumps\n").unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/hooks/pre-backup.d");
        for h in hooks {
            let to = conf.join("pre-backup.d").join(h);
            fs::copy(shipped.join(h), &to).unwrap();
            assert!(
                to.metadata().unwrap().permissions().mode() & 0o111 != 0,
                "{h} is not executable in packaging/"
            );
        }
        Site {
            _dir: dir,
            work,
            conf,
            src,
            dumps,
            store,
        }
    }

    /// Runs byteback-backup with the hooks configured by `env`.
    fn backup(&self, env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin("byteback-backup"));
        cmd.env("BYTEBACK_CONFIG_DIR", &self.conf)
            .env("BYTEBACK_DUMP_DIR", &self.dumps)
            .arg("--destination")
            .arg(&self.store)
            .arg("--source")
            .arg(&self.src)
            .args(["--hostname", "db", "--retry-number", "0", "--verbose"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_status(&mut cmd)
    }

    fn snapshots(&self) -> Vec<String> {
        snapshots(&self.store, "db")
    }

    /// Restores `<dumps>/<name>` from the newest snapshot with the real
    /// byteback-restore; returns the restored file.
    fn restore_dump(&self, name: &str) -> PathBuf {
        let into = self.work.join("restore");
        fs::create_dir_all(&into).unwrap();
        let file = self.dumps.join(name);
        run(Command::new(bin("byteback-restore"))
            .current_dir(&into)
            .arg("--destination")
            .arg(&self.store)
            .args(["--hostname", "db", "--restore"])
            .arg(&file));
        let snap = self.snapshots().pop().unwrap();
        let restored = into.join(snap).join(file.strip_prefix("/").unwrap());
        assert!(restored.is_file(), "{} not restored", restored.display());
        restored
    }
}

// ---------------------------------------------------------------------------
// MariaDB
// ---------------------------------------------------------------------------

const MARIADB_TOOLS: [&str; 5] = [
    "mariadb-install-db",
    "mariadbd",
    "mariadb",
    "mariadb-admin",
    "mariadb-dump",
];

struct Mariadb {
    // Dropped first: the server, then its directory.
    _server: Server,
    socket: PathBuf,
    client: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mariadb {
    fn start(tools: &[PathBuf]) -> Mariadb {
        let [install_db, mariadbd, client, admin, _] = tools else {
            unreachable!()
        };
        let dir = short_tmp("byteback-mariadb-");
        let data = dir.path().join("data");
        let socket = dir.path().join("sock");
        let log = dir.path().join("server.log");
        run(Command::new(install_db)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ]));
        let child = Command::new(mariadbd)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .args(["--skip-networking", "--user=root"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            stop_signal: Signal::KILL,
            log,
        };
        server.wait_ready("mariadbd", || {
            Command::new(admin)
                .arg("--no-defaults")
                .arg(format!("--socket={}", socket.display()))
                .arg("ping")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        Mariadb {
            _server: server,
            socket,
            client: client.clone(),
            _dir: dir,
        }
    }

    fn client(&self) -> Command {
        let mut c = Command::new(&self.client);
        c.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()));
        c
    }

    /// Runs `sql`; returns its output rows, tab-separated.
    fn sql(&self, sql: &str) -> String {
        let o = run(self.client().args(["-N", "-B", "-e", sql]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Environment that points the shipped hook at this server.
    fn hook_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BYTEBACK_MYSQL_SOCKET", self.socket.display().to_string()),
            ("BYTEBACK_MYSQL_DEFAULTS_FILE", String::new()),
            ("BYTEBACK_MYSQL_REQUIRED", "1".into()),
        ]
    }
}

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

// ---------------------------------------------------------------------------
// Steps both servers' tests take
// ---------------------------------------------------------------------------

/// The transfer counter around a backup taken while money moved.
struct DuringBackup {
    /// Transfers committed when the backup started.
    before: u64,
    /// Transfers committed while it ran.
    during: u64,
}

/// Waits until `writer` has committed its warm-up transfers, backs up with
/// the hook configured by `env`, then stops the writer. The backup succeeds
/// and says `dumped`; transfers were committed while it ran.
fn backup_while_money_moves(
    site: &Site,
    env: &[(&'static str, String)],
    writer: Writer,
    counter: impl Fn() -> u64,
    what: &str,
    dumped: &str,
) -> DuringBackup {
    let start = Instant::now();
    while counter() < WARM_UP {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer does not write"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = counter();
    let t_backup = Instant::now();
    let o = site.backup(&env_refs(env));
    let backup_secs = t_backup.elapsed().as_secs_f64();
    let during = counter() - before;
    let sent = writer.finish();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains(dumped), "{out}");
    assert!(during > 0, "no transfer committed during the backup");
    eprintln!(
        "{what}: backup {backup_secs:.1} s, {during} transfers committed during it, {sent} sent in all"
    );
    DuringBackup { before, during }
}

/// Restores the dump `name` from the newest snapshot: it equals the one in
/// the source and is private (0600). Returns the restored file.
fn restored_dump(site: &Site, name: &str) -> PathBuf {
    let dump = site.restore_dump(name);
    assert_eq!(
        fs::read(&dump).unwrap(),
        fs::read(site.dumps.join(name)).unwrap()
    );
    assert_eq!(
        fs::metadata(&dump).unwrap().permissions().mode() & 0o777,
        0o600
    );
    dump
}

/// The sums query's `row` (fields split by `sep`) in a server loaded from
/// the dump: the total and every row are there, and the transfer count is
/// one the writer reached while the backup ran (one snapshot of the data).
fn assert_dump_is_one_snapshot(row: &str, sep: char, b: &DuringBackup) {
    let v: Vec<u64> = row.split(sep).map(|x| x.parse().unwrap()).collect();
    assert_eq!(
        v[0],
        2 * ACCOUNTS * START_BALANCE,
        "the total changed in the dump: {row}"
    );
    assert_eq!(v[1], 2 * ACCOUNTS, "{row}");
    assert_eq!(v[2], BULK_ROWS, "{row}");
    assert!(
        v[3] >= b.before && v[3] <= b.before + b.during,
        "the dump's transfer count {} is not from the backup's time ({}..={})",
        v[3],
        b.before,
        b.before + b.during
    );
}

/// A backup whose dump fails (the hook configured by `env`) fails with exit
/// 1 naming `hook` and `cause`, stores nothing new, keeps the old dump
/// `name` and leaves no temporary file beside it (one left by a dump killed
/// outright before is removed too).
fn failing_dump_keeps_the_old_one(
    site: &Site,
    env: &[(&'static str, String)],
    name: &str,
    hook: &str,
    cause: &str,
) {
    let old = fs::read(site.dumps.join(name)).unwrap();
    fs::write(
        site.dumps.join(format!(".{name}.Ab1234")),
        b"a killed dump's",
    )
    .unwrap();
    let o = site.backup(&env_refs(env));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "pre-backup hook failed, nothing was backed up: pre-backup.d/{hook} exited with \
             status 1"
        )),
        "{out}"
    );
    assert!(out.contains(cause), "{out}");
    assert_eq!(fs::read(site.dumps.join(name)).unwrap(), old);
    assert_eq!(site.snapshots().len(), 1);
    let leftovers: Vec<_> = fs::read_dir(&site.dumps)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
}

/// Two databases, money moving between them, a bulk table and a user with
/// a grant; returns the query of the sums the dump must keep.
fn create_mariadb_banks(db: &Mariadb) -> &'static str {
    db.sql(&format!(
        "CREATE DATABASE bank_a; CREATE DATABASE bank_b; USE bank_a;
         CREATE TABLE bank_a.accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB;
         CREATE TABLE bank_b.accounts LIKE bank_a.accounts;
         INSERT INTO bank_a.accounts SELECT seq, {START_BALANCE} FROM seq_1_to_{ACCOUNTS};
         INSERT INTO bank_b.accounts SELECT seq, {START_BALANCE} FROM seq_1_to_{ACCOUNTS};
         CREATE TABLE bank_a.bulk (id INT PRIMARY KEY, pad VARCHAR(255)) ENGINE=InnoDB;
         INSERT INTO bank_a.bulk SELECT seq, REPEAT(MD5(seq), 7) FROM seq_1_to_{BULK_ROWS};
         CREATE TABLE bank_a.meta (n BIGINT NOT NULL) ENGINE=InnoDB;
         INSERT INTO bank_a.meta VALUES (0);
         CREATE USER clerk@localhost IDENTIFIED BY 'counting';
         GRANT SELECT ON bank_a.accounts TO clerk@localhost;"
    ));
    "SELECT (SELECT SUM(balance) FROM bank_a.accounts) + \
     (SELECT SUM(balance) FROM bank_b.accounts), \
     (SELECT COUNT(*) FROM bank_a.accounts) + (SELECT COUNT(*) FROM bank_b.accounts), \
     (SELECT COUNT(*) FROM bank_a.bulk), (SELECT n FROM bank_a.meta)"
}

/// A client moving money between the two databases' accounts.
fn mariadb_money_mover(db: &Mariadb, site: &Site) -> Writer {
    let mut client = db.client();
    client.arg("bank_a");
    Writer::start(client, site.work.join("writer.log"), |rng| {
        let amount = 1 + rng.below(100);
        let (from, to) = (
            ["a", "b"][rng.below(2) as usize],
            ["a", "b"][rng.below(2) as usize],
        );
        let (i, j) = (1 + rng.below(ACCOUNTS), 1 + rng.below(ACCOUNTS));
        format!(
            "START TRANSACTION; \
             UPDATE bank_{from}.accounts SET balance = balance - {amount} WHERE id = {i}; \
             UPDATE bank_{to}.accounts SET balance = balance + {amount} WHERE id = {j}; \
             UPDATE bank_a.meta SET n = n + 1; COMMIT;\n"
        )
    })
}

#[test]
fn mariadb_dump_is_consistent_while_money_moves() {
    let (tools, missing) = need(&MARIADB_TOOLS);
    let (_, missing2) = need(&["gzip"]);
    let missing: Vec<String> = missing.into_iter().chain(missing2).collect();
    if !can_run("the MariaDB dump test", &missing) {
        return;
    }
    let t0 = Instant::now();
    let site = Site::new(&["50-mysql"]);
    let db = Mariadb::start(&tools);
    let sums = create_mariadb_banks(&db);
    let counter = || -> u64 { db.sql("SELECT n FROM bank_a.meta").parse().unwrap() };
    let b = backup_while_money_moves(
        &site,
        &db.hook_env(),
        mariadb_money_mover(&db, &site),
        counter,
        "mariadb",
        "byteback-backup: pre-backup.d/50-mysql: 50-mysql: dumped all databases into",
    );
    // The source still sums up (the writer kept the invariant).
    let total = 2 * ACCOUNTS * START_BALANCE;
    let live = db.sql(sums);
    assert!(live.starts_with(&format!("{total}\t")), "{live}");

    // The dump in the store loads into a fresh server with the total intact.
    let dump = restored_dump(&site, "mysql.sql.gz");
    let fresh = Mariadb::start(&tools);
    let load = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc '{}' | '{}' --no-defaults --socket='{}'",
        dump.display(),
        fresh.client.display(),
        fresh.socket.display()
    )));
    assert!(load.stderr.is_empty(), "{}", text(&load));
    assert_dump_is_one_snapshot(&fresh.sql(sums), '\t', &b);
    // Users and grants came along (the mysql database, flushed).
    let grants = fresh.sql("SHOW GRANTS FOR clerk@localhost");
    assert!(
        grants.contains("GRANT SELECT ON `bank_a`.`accounts` TO `clerk`@`localhost`"),
        "{grants}"
    );
    drop(fresh);

    let mut env = db.hook_env();
    env.push(("BYTEBACK_MYSQL_USER", "nobody".into()));
    failing_dump_keeps_the_old_one(
        &site,
        &env,
        "mysql.sql.gz",
        "50-mysql",
        "Access denied for user 'nobody'",
    );
    eprintln!("mariadb test: {:.1} s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

const PG_PORT: &str = "54329";

struct Postgres {
    _server: Server,
    bindir: PathBuf,
    sockdir: PathBuf,
    port: String,
    _dir: tempfile::TempDir,
}

/// A command run as the postgres user (setpriv execs, so a kill reaches the
/// program itself).
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
    .arg(program)
    .current_dir("/");
    c
}

impl Postgres {
    fn start(bindir: &Path) -> Postgres {
        Postgres::start_at(bindir, PG_PORT, None)
    }

    /// A server on `port` (a socket only), its socket in `sockdir` (one
    /// of its own when `None`).
    fn start_at(bindir: &Path, port: &str, sockdir: Option<&Path>) -> Postgres {
        let dir = short_tmp("byteback-pg-");
        let out = run(Command::new("id").args(["-u", "postgres"]));
        let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        run(as_postgres(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=peer",
                "--auth-host=reject",
                "--no-instructions",
            ]));
        let child = as_postgres(&bindir.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(sockdir.unwrap_or(dir.path()))
            .args(["-p", port, "-c", "listen_addresses="])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // SIGQUIT: immediate shutdown, the server's children too.
        let mut server = Server {
            child,
            stop_signal: Signal::QUIT,
            log,
        };
        let sockdir = sockdir.unwrap_or(dir.path()).to_path_buf();
        server.wait_ready("postgres", || {
            Command::new(bindir.join("pg_isready"))
                .arg("-h")
                .arg(&sockdir)
                .args(["-p", port, "-q"])
                .status()
                .is_ok_and(|s| s.success())
        });
        Postgres {
            _server: server,
            bindir: bindir.to_path_buf(),
            sockdir,
            port: port.to_string(),
            _dir: dir,
        }
    }

    fn psql_cmd(&self, db: &str) -> Command {
        let mut c = as_postgres(&self.bindir.join("psql"));
        c.arg("-h").arg(&self.sockdir).args([
            "-p",
            &self.port,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
        ]);
        c
    }

    /// Runs `sql` in `db`; returns its rows, `|`-separated.
    fn sql(&self, db: &str, sql: &str) -> String {
        let o = run(self.psql_cmd(db).args(["-A", "-t", "-c", sql]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn hook_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BYTEBACK_PG_HOST", self.sockdir.display().to_string()),
            ("BYTEBACK_PG_PORT", PG_PORT.into()),
            ("BYTEBACK_PG_REQUIRED", "1".into()),
        ]
    }
}

/// What the PostgreSQL test needs and this machine lacks, and the server's
/// bin directory.
fn postgres_missing() -> (Option<PathBuf>, Vec<String>) {
    let bindir = postgres_bindir();
    let mut missing = Vec::new();
    match &bindir {
        Some(b) => {
            for t in ["initdb", "postgres", "pg_isready", "psql"] {
                if !b.join(t).is_file() {
                    missing.push(format!("{}/{t}", b.display()));
                }
            }
        }
        None => missing.push("/usr/lib/postgresql/*/bin/postgres".into()),
    }
    missing.extend(need(&["pg_dumpall", "setpriv", "runuser", "gzip"]).1);
    if Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        missing.push("the postgres user".into());
    }
    (bindir, missing)
}

/// Databases `bank` (two account tables, money moving between them, a bulk
/// table between them in the dump, a grant) and `other`, and a role;
/// returns the query of the sums the dump must keep.
fn create_postgres_banks(db: &Postgres) -> &'static str {
    db.sql("postgres", "CREATE DATABASE bank");
    db.sql("postgres", "CREATE DATABASE other");
    db.sql("postgres", "CREATE ROLE clerk LOGIN");
    db.sql(
        "other",
        "CREATE TABLE t (x text); INSERT INTO t VALUES ('in another database')",
    );
    db.sql(
        "bank",
        &format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             CREATE TABLE savings (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
             INSERT INTO savings SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
             CREATE TABLE bulk (id int PRIMARY KEY, pad text);
             INSERT INTO bulk SELECT g, repeat(md5(g::text), 7) FROM generate_series(1, {BULK_ROWS}) g;
             CREATE TABLE meta (n bigint NOT NULL);
             INSERT INTO meta VALUES (0);
             GRANT SELECT ON accounts TO clerk;"
        ),
    );
    "SELECT (SELECT sum(balance) FROM accounts) + (SELECT sum(balance) FROM savings), \
     (SELECT count(*) FROM accounts) + (SELECT count(*) FROM savings), \
     (SELECT count(*) FROM bulk), (SELECT n FROM meta)"
}

/// A client moving money between `accounts` and `savings`.
fn postgres_money_mover(db: &Postgres, site: &Site) -> Writer {
    Writer::start(db.psql_cmd("bank"), site.work.join("writer.log"), |rng| {
        let amount = 1 + rng.below(100);
        let tables = ["accounts", "savings"];
        let (from, to) = (tables[rng.below(2) as usize], tables[rng.below(2) as usize]);
        let (i, j) = (1 + rng.below(ACCOUNTS), 1 + rng.below(ACCOUNTS));
        format!(
            "BEGIN; UPDATE {from} SET balance = balance - {amount} WHERE id = {i}; \
             UPDATE {to} SET balance = balance + {amount} WHERE id = {j}; \
             UPDATE meta SET n = n + 1; COMMIT;\n"
        )
    })
}

/// Loads `dump` as the README says (gunzip | psql -f - postgres) into the
/// fresh cluster `fresh`; only "role postgres already exists" may complain.
fn load_postgres_dump(bindir: &Path, dump: &Path, fresh: &Postgres) {
    let load = run_status(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc '{}' | setpriv --reuid=postgres --regid=postgres --init-groups -- \
         '{}' -X -q -h '{}' -p {PG_PORT} -f - postgres",
        dump.display(),
        bindir.join("psql").display(),
        fresh.sockdir.display()
    )));
    let load_out = text(&load);
    assert!(load.status.success(), "{load_out}");
    let errors: Vec<&str> = load_out
        .lines()
        .filter(|l| l.contains("ERROR"))
        .filter(|l| !l.contains("role \"postgres\" already exists"))
        .collect();
    assert!(errors.is_empty(), "loading the dump: {load_out}");
}

#[test]
fn postgresql_dump_is_consistent_while_money_moves() {
    let (bindir, missing) = postgres_missing();
    if !can_run("the PostgreSQL dump test", &missing) {
        return;
    }
    let bindir = bindir.unwrap();
    let t0 = Instant::now();
    let site = Site::new(&["50-postgresql"]);
    let db = Postgres::start(&bindir);
    let sums = create_postgres_banks(&db);
    let counter = || -> u64 { db.sql("bank", "SELECT n FROM meta").parse().unwrap() };
    let b = backup_while_money_moves(
        &site,
        &db.hook_env(),
        postgres_money_mover(&db, &site),
        counter,
        "postgresql",
        "byteback-backup: pre-backup.d/50-postgresql: 50-postgresql: dumped all databases \
         and roles into",
    );
    let total = 2 * ACCOUNTS * START_BALANCE;
    let live = db.sql("bank", sums);
    assert!(live.starts_with(&format!("{total}|")), "{live}");

    let dump = restored_dump(&site, "postgresql.sql.gz");
    let fresh = Postgres::start(&bindir);
    load_postgres_dump(&bindir, &dump, &fresh);
    assert_dump_is_one_snapshot(&fresh.sql("bank", sums), '|', &b);
    assert_eq!(fresh.sql("other", "SELECT x FROM t"), "in another database");
    assert_eq!(
        fresh.sql(
            "bank",
            "SELECT has_table_privilege('clerk', 'accounts', 'SELECT')"
        ),
        "t"
    );
    drop(fresh);

    let mut env = db.hook_env();
    env.push(("BYTEBACK_PG_DUMP_OPTIONS", "--database=no_such_db".into()));
    failing_dump_keeps_the_old_one(
        &site,
        &env,
        "postgresql.sql.gz",
        "50-postgresql",
        "no_such_db",
    );
    eprintln!("postgresql test: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Every cluster Debian's `pg_lsclusters` names is dumped (here a stand-in
/// naming two private servers and, then, one that is down): one that is
/// not on port 5432 into `postgresql-VERSION-NAME.sql.gz`; a cluster that
/// is down fails the hook (its files are excluded, and no dump would hold
/// them) unless BYTEBACK_PG_REQUIRED=0. Before, `pg_dumpall` reached the
/// default port's server only, and other clusters were in no dump.
#[test]
fn every_postgresql_cluster_is_dumped() {
    let (bindir, missing) = postgres_missing();
    if !can_run("the PostgreSQL clusters test", &missing) {
        return;
    }
    let bindir = bindir.unwrap();
    let site = Site::new(&["50-postgresql"]);
    let a = Postgres::start_at(&bindir, "54331", None);
    let b = Postgres::start_at(&bindir, "54332", Some(&a.sockdir));
    a.sql("postgres", "CREATE DATABASE only_in_a");
    b.sql("postgres", "CREATE DATABASE only_in_b");
    let fake = site.work.join("fake-bin");
    fs::create_dir_all(&fake).unwrap();
    let listing = site.work.join("clusters");
    fs::write(
        &listing,
        "15 main 54331 online postgres /x /y\n16 other 54332 online postgres /x /y\n",
    )
    .unwrap();
    write_script(
        &fake.join("pg_lsclusters"),
        &format!("#!/bin/sh\ncat '{}'\n", listing.display()),
    );
    let path = format!(
        "{}:{}:{}",
        fake.display(),
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sockdir = a.sockdir.display().to_string();
    let env = [
        ("PATH", path.as_str()),
        ("BYTEBACK_PG_HOST", sockdir.as_str()),
        ("BYTEBACK_PG_REQUIRED", "1"),
    ];
    let o = site.backup(&env);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for (file, db, not) in [
        ("postgresql-15-main.sql.gz", "only_in_a", "only_in_b"),
        ("postgresql-16-other.sql.gz", "only_in_b", "only_in_a"),
    ] {
        let dump = restored_dump(&site, file);
        let sql = run(Command::new("gunzip").arg("-c").arg(&dump));
        let sql = String::from_utf8_lossy(&sql.stdout);
        assert!(sql.contains(&format!("CREATE DATABASE {db}")), "{file}");
        assert!(!sql.contains(&format!("CREATE DATABASE {not}")), "{file}");
    }
    // A third cluster, down: the hook fails, naming it, unless told.
    fs::write(
        &listing,
        "15 main 54331 online postgres /x /y\n16 other 54332 online postgres /x /y\n\
         17 old 54333 down postgres /x /y\n",
    )
    .unwrap();
    let o = site.backup(&env);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("FAILED: PostgreSQL cluster(s) 17/old (down) not running"),
        "{out}"
    );
    let mut off = env.to_vec();
    off[2] = ("BYTEBACK_PG_REQUIRED", "0");
    let o = site.backup(&off);
    assert!(o.status.success(), "{}", text(&o));
}

// ---------------------------------------------------------------------------
// No server
// ---------------------------------------------------------------------------

/// With no server answering (or none installed) the hooks note it and let
/// the backup go on; no root needed. Once an earlier run's dump is there,
/// a server that does not answer fails the backup (it would carry the old
/// dump as if current), unless the hook is told the server is off on
/// purpose.
#[test]
fn the_hooks_do_nothing_without_a_server() {
    let site = Site::new(&["50-mysql", "50-postgresql"]);
    let nowhere = site.work.join("nowhere");
    let nowhere = nowhere.display().to_string();
    let socket = format!("{nowhere}/mysql.sock");
    // The servers' data directories: none here (this machine's own, from
    // the packages the suite installs, are not the test's).
    let mysql_data = site.work.join("mysql-data").display().to_string();
    let pg_data = site.work.join("pg-data").display().to_string();
    let env = [
        ("BYTEBACK_MYSQL_SOCKET", socket.as_str()),
        ("BYTEBACK_MYSQL_DEFAULTS_FILE", ""),
        ("BYTEBACK_MYSQL_DATADIR", mysql_data.as_str()),
        ("BYTEBACK_PG_HOST", nowhere.as_str()),
        ("BYTEBACK_PG_PORT", PG_PORT),
        ("BYTEBACK_PG_DATADIR", pg_data.as_str()),
    ];
    let o = site.backup(&env);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for hook in ["50-mysql", "50-postgresql"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("byteback-backup: pre-backup.d/{hook}: {hook}: ")))
            .unwrap_or_else(|| panic!("no note from {hook}: {out}"));
        assert!(line.contains(", nothing to dump"), "{line}");
    }
    assert_eq!(site.snapshots().len(), 1);
    assert!(!site.dumps.exists(), "{out}");

    // No dump yet, but a server's databases are there (it is down, or
    // listens elsewhere): the backup would hold neither them (excluded)
    // nor a dump, so the hooks fail, naming the data directory.
    fs::create_dir_all(site.work.join("mysql-data/mysql")).unwrap();
    fs::create_dir_all(site.work.join("pg-data/15/main")).unwrap();
    fs::write(site.work.join("pg-data/15/main/PG_VERSION"), b"15\n").unwrap();
    let o = site.backup(&env);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for (what, data) in [("MariaDB/MySQL", &mysql_data), ("PostgreSQL", &pg_data)] {
        assert!(
            out.contains(&format!("FAILED: no {what} server answers (")),
            "{out}"
        );
        assert!(
            out.contains(&format!("and {data} holds a")),
            "{data}: {out}"
        );
    }
    assert_eq!(site.snapshots().len(), 1, "{out}");
    let mut off = env.to_vec();
    off.extend([
        ("BYTEBACK_MYSQL_REQUIRED", "0"),
        ("BYTEBACK_PG_REQUIRED", "0"),
    ]);
    let o = site.backup(&off);
    assert!(o.status.success(), "{}", text(&o));
    fs::remove_dir_all(site.work.join("mysql-data")).unwrap();
    fs::remove_dir_all(site.work.join("pg-data")).unwrap();

    // Earlier runs' dumps, and no server now.
    fs::create_dir_all(&site.dumps).unwrap();
    for dump in ["mysql.sql.gz", "postgresql.sql.gz"] {
        fs::write(site.dumps.join(dump), b"an old dump").unwrap();
    }
    let o = site.backup(&env);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for what in ["MariaDB/MySQL", "PostgreSQL"] {
        assert!(
            out.contains(&format!("FAILED: no {what} server answers (")),
            "{out}"
        );
    }
    assert!(out.contains("earlier run's dump"), "{out}");
    assert_eq!(site.snapshots().len(), 2, "{out}");
    // Off on purpose: the old dumps go as they are.
    let o = site.backup(&off);
    assert!(o.status.success(), "{}", text(&o));

    // No client installed at all (the hooks' PATH has none), and the old
    // dumps still there: the same failure, naming why.
    let empty = site.work.join("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let mut gone = env.to_vec();
    let path = empty.display().to_string();
    gone.push(("PATH", path.as_str()));
    let o = site.backup(&gone);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for what in ["MariaDB/MySQL", "PostgreSQL"] {
        assert!(
            out.contains(&format!("{what} is not installed, and "))
                && out.contains("earlier run's dump"),
            "{out}"
        );
    }
    gone.extend([
        ("BYTEBACK_MYSQL_REQUIRED", "0"),
        ("BYTEBACK_PG_REQUIRED", "0"),
    ]);
    let o = site.backup(&gone);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("is not installed, nothing to dump"), "{out}");
}
