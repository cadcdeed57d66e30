//! What the programs print on stderr besides data: log lines at a level
//! (`-q`, `-v`, `-vv`, `BYTEBACK_LOG`), with sd-daemon priority prefixes
//! when stderr is the journal, and a progress bar on a terminal that log
//! lines are printed above.
//!
//! Log lines go through `tracing`; [`init_logging`] installs a subscriber
//! that writes each event as one line, `PROG: text` (`PROG: warning: text`
//! for warnings), the way the programs always printed them. While a bar is
//! shown ([`show_bar`]), every line is written with the bar suspended, so
//! the two never garble each other.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The target of events that are one path each (a backup's or restore's
/// `-v` listing): printed bare, without the program's name.
pub const FILE_TARGET: &str = "byteback::file";

/// The environment variable naming the log level.
pub const LOG_ENV: &str = "BYTEBACK_LOG";

/// The level for `-q`, `-v` (counted) and `BYTEBACK_LOG`: a flag on the
/// command line wins (`-q` warnings and errors only, `-v` debug, `-vv`
/// trace); else `BYTEBACK_LOG` (`off`, `error`, `warn`, `info`, `debug`,
/// `trace`); else info. A `BYTEBACK_LOG` that is none of these is an error
/// naming it.
pub fn log_level(verbose: u8, quiet: bool) -> Result<LevelFilter, String> {
    if quiet {
        return Ok(LevelFilter::WARN);
    }
    match verbose {
        0 => {}
        1 => return Ok(LevelFilter::DEBUG),
        _ => return Ok(LevelFilter::TRACE),
    }
    match std::env::var_os(LOG_ENV) {
        None => Ok(LevelFilter::INFO),
        Some(v) => parse_level(v.as_encoded_bytes()).ok_or_else(|| {
            format!(
                "{LOG_ENV}={} is not a log level (off, error, warn, info, debug or trace)",
                crate::escape_bytes(v.as_encoded_bytes())
            )
        }),
    }
}

fn parse_level(v: &[u8]) -> Option<LevelFilter> {
    let v = v.trim_ascii().to_ascii_lowercase();
    Some(match &v[..] {
        b"off" => LevelFilter::OFF,
        b"error" => LevelFilter::ERROR,
        b"warn" | b"warning" => LevelFilter::WARN,
        b"info" | b"" => LevelFilter::INFO,
        b"debug" => LevelFilter::DEBUG,
        b"trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// Whether stderr is the journal: systemd sets `JOURNAL_STREAM` to
/// `DEVICE:INODE` of the stream it connects, and it is ours only if stderr
/// is still that stream (not redirected by a script in between).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // st_dev and st_ino are not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    match rustix::fs::fstat(io::stderr().as_fd()) {
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Installs the subscriber: events up to `level` go to stderr as lines
/// `PROG: text`, each line with a `<N>` priority prefix when `journal`
/// (see [`stderr_is_journal`]). Installing twice keeps the first.
pub fn init_logging(prog: &'static str, level: LevelFilter, journal: bool) {
    JOURNAL.store(journal, Ordering::Relaxed);
    let _ = PROG.set(prog);
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .event_format(Line { prog, journal })
        .with_writer(StderrAboveBar)
        .finish();
    // Only the first subscriber of a process counts (tests may call this again).
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Whether [`init_logging`] was told stderr is the journal.
static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Writes `text` (whole lines, the program's name already in them) at
/// `level`: nothing if the level is off, each line with its priority under
/// the journal, above the progress bar. For lines a program formats itself
/// (the pruner's log).
pub fn print_lines(level: Level, text: &[u8]) {
    if LevelFilter::current() < level {
        return;
    }
    if !JOURNAL.load(Ordering::Relaxed) {
        return write_stderr(text);
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    for line in text.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(format!("<{}>", priority(&level)).as_bytes());
        out.extend_from_slice(line);
    }
    write_stderr(&out);
}

/// A writer of lines at a level (see [`print_lines`]); wrap it in a
/// `LineWriter` so that each write is whole lines.
#[derive(Debug, Clone, Copy)]
pub struct LinesAt(pub Level);

impl Write for LinesAt {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        print_lines(self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One event as the programs print it.
struct Line {
    prog: &'static str,
    journal: bool,
}

/// sd-daemon(3) priority of a level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = event.metadata().level();
        let mut text = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut text), event)?;
        let head = if *level == Level::WARN {
            "warning: "
        } else {
            ""
        };
        // A message may span lines (a hook's last output, indented); any
        // other control character that got into one is shown escaped.
        for (i, line) in text.split('\n').enumerate() {
            if self.journal {
                write!(writer, "<{}>", priority(level))?;
            }
            if i == 0 && event.metadata().target() != FILE_TARGET {
                write!(writer, "{}: {head}", self.prog)?;
            }
            writeln!(writer, "{}", crate::text::escape_controls(line))?;
        }
        Ok(())
    }
}

/// The progress bar on screen, if any: log lines are printed above it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Makes `bar` the one log lines are printed above, until [`hide_bar`].
pub fn show_bar(bar: &ProgressBar) {
    *BAR.lock().unwrap_or_else(PoisonError::into_inner) = Some(bar.clone());
}

/// Whether a progress bar is shown.
pub fn bar_shown() -> bool {
    BAR.lock().unwrap_or_else(PoisonError::into_inner).is_some()
}

/// Clears the bar from the screen; lines go straight to stderr again.
pub fn hide_bar() {
    if let Some(b) = BAR.lock().unwrap_or_else(PoisonError::into_inner).take() {
        b.finish_and_clear();
    }
}

/// Writes `bytes` to stderr, above the progress bar if one is shown,
/// waiting for room at most [`STDERR_WAIT`] (see [`write_bounded`]).
pub fn write_stderr(bytes: &[u8]) {
    let bar = BAR.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let write = || write_bounded(bytes);
    match bar {
        Some(b) => b.suspend(write),
        None => write(),
    }
}

/// Longest a write to stderr waits for room: a stderr nobody reads (a pipe
/// to a stopped reader, a stalled journal) must not stop the program, whose
/// every thread logs. What finds no room is dropped, counted, and said once
/// stderr takes lines again.
const STDERR_WAIT: Duration = Duration::from_secs(5);
/// A write found no room: later ones do not wait, until one goes through.
static STDERR_STALLED: AtomicBool = AtomicBool::new(false);
/// Lines dropped since stderr stopped taking them.
static STDERR_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Bytes written at once: a pipe with room (as `poll` says) takes this
/// many without blocking.
const STDERR_CHUNK: usize = 4096;

/// Whether `fd` has room for a write within `wait`.
fn room(fd: libc::c_int, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, valid for the call, and its count.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    // An error (a signal), or a stderr closed or broken: the write finds
    // out at once.
    n != 0
}

/// When stderr is a terminal, a descriptor of its own for it that does not
/// block (opened anew through `/proc`, so the flag is not the shared one's,
/// which the shell and other programs use too): a terminal with some room
/// takes a line only as that room allows, so a blocking write could wait
/// for ever however `poll` answered. `None` elsewhere: a pipe with room
/// takes [`STDERR_CHUNK`] bytes at once, and files and sockets are written
/// as they are.
fn tty_writer() -> Option<&'static std::fs::File> {
    static TTY: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    TTY.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        if !rustix::termios::isatty(io::stderr().as_fd()) {
            return None;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open("/proc/self/fd/2")
            .ok()
    })
    .as_ref()
}

/// Writes all of `chunk` to `out` (the terminal's descriptor that does not
/// block), waiting for room at most `wait` in all; false if it did not fit.
fn write_tty(out: &std::fs::File, mut chunk: &[u8], wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let start = std::time::Instant::now();
    while !chunk.is_empty() {
        match (&*out).write(chunk) {
            Ok(0) => return false,
            Ok(n) => chunk = &chunk[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = wait.saturating_sub(start.elapsed());
                if left.is_zero() || !room(out.as_raw_fd(), left) {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Writes `bytes` to stderr unless it has taken nothing for
/// [`STDERR_WAIT`] (then they are dropped and counted; while it stays
/// blocked, later writes are dropped without waiting).
fn write_bounded(bytes: &[u8]) {
    let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count().max(1) as u64;
    let mut e = io::stderr().lock();
    let tty = tty_writer();
    // One chunk, waiting at most `wait`: whether it went.
    let mut put = |chunk: &[u8], wait: Duration| match tty {
        Some(t) => write_tty(t, chunk, wait),
        None => room(2, wait) && e.write_all(chunk).is_ok(),
    };
    if STDERR_STALLED.load(Ordering::Relaxed) {
        if !room(2, Duration::ZERO) {
            STDERR_DROPPED.fetch_add(lines(bytes), Ordering::Relaxed);
            return;
        }
        STDERR_STALLED.store(false, Ordering::Relaxed);
        let n = STDERR_DROPPED.swap(0, Ordering::Relaxed);
        let note = format!(
            "{}{}: {n} lines of log were dropped while stderr took nothing\n",
            if JOURNAL.load(Ordering::Relaxed) {
                "<4>"
            } else {
                ""
            },
            PROG.get().copied().unwrap_or("byteback")
        );
        put(note.as_bytes(), STDERR_WAIT);
    }
    for (i, chunk) in bytes.chunks(STDERR_CHUNK).enumerate() {
        if !put(chunk, STDERR_WAIT) {
            STDERR_STALLED.store(true, Ordering::Relaxed);
            STDERR_DROPPED.fetch_add(lines(&bytes[i * STDERR_CHUNK..]), Ordering::Relaxed);
            return;
        }
    }
    let _ = e.flush();
}

/// The program's name, for lines of its own (see [`init_logging`]).
static PROG: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// stderr, above the progress bar if one is shown: each `write` is put
/// there whole (the subscriber writes each event in one `write_all`; wrap
/// it in a `LineWriter` for `writeln!`).
#[derive(Debug, Clone, Copy)]
pub struct StderrAboveBar;

impl Write for StderrAboveBar {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_stderr(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StderrAboveBar {
    type Writer = StderrAboveBar;

    fn make_writer(&'a self) -> StderrAboveBar {
        StderrAboveBar
    }
}

/// Whether to draw progress: `--no-progress` never, `--progress` always,
/// else only when stderr is a terminal (not a log, not cron) whose `TERM`
/// is not `dumb`.
pub fn progress_wanted(progress: bool, no_progress: bool) -> bool {
    if no_progress {
        return false;
    }
    if progress {
        return true;
    }
    rustix::termios::isatty(io::stderr().as_fd())
        && std::env::var_os("TERM").is_some_and(|t| t != "dumb")
}

/// A progress bar in `style` drawing on stderr (whether or not it is a
/// terminal: the caller decided with [`progress_wanted`]), shown
/// ([`show_bar`]) and drawn at once, then redrawn by indicatif's own ticker
/// 10 times a second (the style's keys read the figures when it draws).
pub fn new_bar(style: ProgressStyle) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        None,
        ProgressDrawTarget::term_like_with_hz(Box::new(Screen), 10),
    );
    bar.set_style(style);
    bar.tick();
    bar.enable_steady_tick(Duration::from_millis(100));
    show_bar(&bar);
    bar
}

/// The width of the terminal on stderr (80 when it has none).
pub fn width() -> u16 {
    rustix::termios::tcgetwinsize(io::stderr().as_fd())
        .ok()
        .map(|w| w.ws_col)
        .filter(|&c| c > 0)
        .unwrap_or(80)
}

/// stderr as indicatif's terminal (ANSI cursor movements).
#[derive(Debug)]
struct Screen;

impl Screen {
    /// Bounded as every line is (see [`write_bounded`]): a bar redrawn on
    /// a terminal whose reader stopped must not stop the program.
    fn put(&self, s: &str) -> io::Result<()> {
        write_bounded(s.as_bytes());
        Ok(())
    }
}

impl TermLike for Screen {
    fn width(&self) -> u16 {
        width()
    }
    fn height(&self) -> u16 {
        rustix::termios::tcgetwinsize(io::stderr().as_fd())
            .ok()
            .map(|w| w.ws_row)
            .filter(|&r| r > 0)
            .unwrap_or(24)
    }
    fn move_cursor_up(&self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}A"))
    }
    fn move_cursor_down(&self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}B"))
    }
    fn move_cursor_right(&self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}C"))
    }
    fn move_cursor_left(&self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}D"))
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.put(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_flags_win() {
        assert_eq!(parse_level(b"debug"), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level(b" WARN\n"), Some(LevelFilter::WARN));
        assert_eq!(parse_level(b"off"), Some(LevelFilter::OFF));
        assert_eq!(parse_level(b"loud"), None);
        assert_eq!(log_level(0, true), Ok(LevelFilter::WARN));
        assert_eq!(log_level(1, false), Ok(LevelFilter::DEBUG));
        assert_eq!(log_level(2, false), Ok(LevelFilter::TRACE));
    }

    #[test]
    fn priorities_are_sd_daemon_ones() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
