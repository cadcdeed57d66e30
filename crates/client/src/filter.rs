//! rsync filter rules (`/etc/byteback/rsync_filter`, as byteback 1.x passed
//! it to `rsync --relative --filter='merge FILE'`): parsing, and a pure
//! matcher the walk asks about each entry.
//!
//! Supported, with rsync's semantics: `+`/`-`/`include`/`exclude` (modifiers
//! `/`, `!`, `s`; `r` makes a rule a no-op), `H`/`hide` (= `-s`), `S`/`show`
//! (= `+s`), `P`/`protect`/`R`/`risk` (receiver-side: no-ops with a note),
//! `!`/`clear`, `merge`/`.` (modifiers `-`, `+`) and `dir-merge`/`:` of a
//! plain file name or `/NAME` (modifiers `-`, `+`, `n`, `e`), comments and
//! blank lines.
//! Anything else is an error naming the file and line.
//!
//! Paths are matched as rsync `--relative` from `/` sees them: relative to
//! the filesystem root (no leading `/`). A leading `/` anchors a rule at the
//! root, or, in a per-directory file, at that file's directory. Per-directory
//! rules live in [`DirRules`], one frame per directory of the walk's stack,
//! so memory follows the depth of the walk, never the size of the tree.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Largest global filter file read (`rsync_filter` or a file it merges).
pub const MAX_FILTER_FILE: usize = 1 << 20;
/// Largest per-directory filter file read.
pub const MAX_DIR_FILE: usize = 256 << 10;
/// Most bytes of per-directory files whose rules are held at once (along
/// the walk's current path): anyone who can write a directory can write
/// such a file, so deep trees of them must not exhaust memory.
pub const MAX_DIR_RULES_HELD: usize = 4 << 20;
/// Longest rule line.
pub const MAX_LINE: usize = 4096;
/// What a parsed rule holds besides its line, counted against
/// [`MAX_DIR_RULES_HELD`].
const RULE_HELD: usize = 160;
/// Deepest nesting of `merge` rules.
const MAX_MERGE_DEPTH: usize = 8;
/// Most `dir-merge` rules in the global list.
const MAX_DIR_MERGES: usize = 16;

/// A rule that cannot be used: the file, its line (1-based) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// File holding the rule.
    pub file: PathBuf,
    /// Line number, 1-based (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Escaped: names and lines of per-directory files come from
        // whoever can write a directory, and go to root's terminal or mail.
        let file = self.file.as_os_str().as_bytes().escape_ascii();
        if self.line == 0 {
            write!(f, "{file}: {}", self.message)
        } else {
            write!(f, "{file}:{}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for FilterError {}

/// One token of a wildcard pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Byte(u8),
    /// `?`: one byte, not `/`.
    One,
    /// `[...]`: one byte of the set (256 bits), not `/`.
    Class(Box<[u64; 4]>),
    /// `*`: any bytes but `/`.
    Star,
    /// `**`: any bytes.
    Stars,
}

/// A compiled rsync pattern (wildmatch): `*`, `**`, `?`, `[...]`, `\`
/// escapes; a pattern without `*?[` is compared literally, as rsync does
/// (its backslashes are ordinary bytes then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    toks: Vec<Tok>,
    /// Matches nothing: rsync's wildmatch gives up on an unterminated `[`
    /// or an unknown `[:class:]` (the rule never matches; with `!`, it
    /// matches everything).
    inert: bool,
}

fn posix_class(name: &[u8], b: u8) -> Option<bool> {
    Some(match name {
        b"alnum" => b.is_ascii_alphanumeric(),
        b"alpha" => b.is_ascii_alphabetic(),
        b"blank" => b == b' ' || b == b'\t',
        b"cntrl" => b.is_ascii_control(),
        b"digit" => b.is_ascii_digit(),
        b"graph" => b.is_ascii_graphic(),
        b"lower" => b.is_ascii_lowercase(),
        b"print" => b.is_ascii_graphic() || b == b' ',
        b"punct" => b.is_ascii_punctuation(),
        b"space" => b.is_ascii_whitespace() || b == 0x0b,
        b"upper" => b.is_ascii_uppercase(),
        b"xdigit" => b.is_ascii_hexdigit(),
        _ => return None,
    })
}

impl Glob {
    /// Compiles `pat`; an unterminated `[` or an unknown `[:class:]` is an error.
    pub fn new(pat: &[u8]) -> Result<Glob, String> {
        if !pat.iter().any(|b| matches!(b, b'*' | b'?' | b'[')) {
            return Ok(Glob {
                toks: pat.iter().map(|&b| Tok::Byte(b)).collect(),
                inert: false,
            });
        }
        let mut toks = vec![];
        let mut i = 0;
        while i < pat.len() {
            match pat[i] {
                b'\\' if i + 1 < pat.len() => {
                    toks.push(Tok::Byte(pat[i + 1]));
                    i += 2;
                }
                b'*' => {
                    let mut n = 0;
                    while pat.get(i + n) == Some(&b'*') {
                        n += 1;
                    }
                    toks.push(if n > 1 { Tok::Stars } else { Tok::Star });
                    i += n;
                }
                b'?' => {
                    toks.push(Tok::One);
                    i += 1;
                }
                b'[' => {
                    let (set, next) = Self::class(pat, i + 1)?;
                    toks.push(Tok::Class(set));
                    i = next;
                }
                b => {
                    toks.push(Tok::Byte(b));
                    i += 1;
                }
            }
        }
        Ok(Glob { toks, inert: false })
    }

    /// Compiles `pat` as rsync does: where [`Glob::new`] fails (an
    /// unterminated `[`, an unknown `[:class:]`), rsync's wildmatch aborts
    /// every match, so the glob matches nothing; the reason comes with it.
    pub fn lenient(pat: &[u8]) -> (Glob, Option<String>) {
        match Glob::new(pat) {
            Ok(g) => (g, None),
            Err(why) => (Glob::nothing(), Some(why)),
        }
    }

    /// A glob that matches no text.
    fn nothing() -> Glob {
        Glob {
            toks: vec![],
            inert: true,
        }
    }

    /// Parses a class starting after its `[`: the set and the index after `]`.
    fn class(pat: &[u8], mut i: usize) -> Result<(Box<[u64; 4]>, usize), String> {
        let mut set = [false; 256];
        let negate = matches!(pat.get(i), Some(b'!' | b'^'));
        if negate {
            i += 1;
        }
        let mut first = true;
        loop {
            let Some(&c) = pat.get(i) else {
                return Err("unterminated character class '['".into());
            };
            if c == b']' && !first {
                i += 1;
                break;
            }
            first = false;
            if c == b'[' && pat.get(i + 1) == Some(&b':') {
                let rest = &pat[i + 2..];
                let Some(end) = rest.windows(2).position(|w| w == b":]") else {
                    return Err("unterminated '[:' class".into());
                };
                let name = &rest[..end];
                if posix_class(name, 0).is_none() {
                    return Err(format!(
                        "unknown character class [:{}:]",
                        name.escape_ascii()
                    ));
                }
                for b in 0..=255u8 {
                    if posix_class(name, b) == Some(true) {
                        set[b as usize] = true;
                    }
                }
                i += 2 + end + 2;
                continue;
            }
            let (lo, after) = if c == b'\\' {
                match pat.get(i + 1) {
                    Some(&e) => (e, i + 2),
                    None => return Err("unterminated character class '['".into()),
                }
            } else {
                (c, i + 1)
            };
            i = after;
            if pat.get(i) == Some(&b'-') && pat.get(i + 1).is_some_and(|&h| h != b']') {
                let mut hi = pat[i + 1];
                i += 2;
                if hi == b'\\' {
                    hi = *pat.get(i).ok_or("unterminated character class '['")?;
                    i += 1;
                }
                for b in lo..=hi {
                    set[b as usize] = true;
                }
            } else {
                set[lo as usize] = true;
            }
        }
        let mut bits = [0u64; 4];
        for (b, on) in set.iter().enumerate() {
            if *on != negate {
                bits[b / 64] |= 1 << (b % 64);
            }
        }
        Ok((Box::new(bits), i))
    }

    /// Whether the whole of `text` matches.
    pub fn matches(&self, text: &[u8]) -> bool {
        if self.inert {
            return false;
        }
        let bytes_match = |toks: &[Tok], text: &[u8]| {
            toks.len() == text.len() && toks.iter().zip(text).all(|(t, b)| *t == Tok::Byte(*b))
        };
        // The common shapes without the general matcher (and its allocations):
        // `name`, `*.ext`, `prefix*`.
        match self.toks.split_first() {
            Some((Tok::Star, rest)) if rest.iter().all(|t| matches!(t, Tok::Byte(_))) => {
                // `*` matches no `/`; the literal tail may hold some (`*/x`).
                return text.len() >= rest.len()
                    && !text[..text.len() - rest.len()].contains(&b'/')
                    && bytes_match(rest, &text[text.len() - rest.len()..]);
            }
            _ if self.toks.iter().all(|t| matches!(t, Tok::Byte(_))) => {
                return bytes_match(&self.toks, text);
            }
            _ => {}
        }
        if let Some((Tok::Star, lead)) = self.toks.split_last() {
            if lead.iter().all(|t| matches!(t, Tok::Byte(_))) {
                return text.len() >= lead.len()
                    && bytes_match(lead, &text[..lead.len()])
                    && !text[lead.len()..].contains(&b'/');
            }
        }
        self.nfa(text, false)
    }

    /// Whether `text` or one of its tails that starts after a `/` matches
    /// (an unanchored pattern with a `/` or `**`), in one pass.
    pub fn matches_tail(&self, text: &[u8]) -> bool {
        if self.inert {
            return false;
        }
        let n = text.len();
        let literal = |t: &[Tok]| t.iter().all(|t| matches!(t, Tok::Byte(_)));
        let ends_with = |toks: &[Tok]| {
            n >= toks.len()
                && (toks.iter().zip(&text[n - toks.len()..])).all(|(t, b)| *t == Tok::Byte(*b))
        };
        if literal(&self.toks) {
            let p = self.toks.len();
            return ends_with(&self.toks) && (n == p || text[n - p - 1] == b'/');
        }
        // `*rest`: the tail after the last `/` before `rest` always fits.
        match self.toks.split_first() {
            Some((Tok::Star, rest)) if literal(rest) => ends_with(rest),
            _ => self.nfa(text, true),
        }
    }

    /// The general matcher: positions of `text` reachable after each token
    /// (an NFA, one row at a time), starting at 0 and, with `tails`, after
    /// every `/`. Costs (tokens + 1) x (bytes + 1) steps at most.
    fn nfa(&self, text: &[u8], tails: bool) -> bool {
        let n = text.len();
        #[cfg(test)]
        tests::NFA_STEPS.with(|c| c.set(c.get() + (self.toks.len() as u64 + 1) * (n as u64 + 1)));
        let mut cur = vec![false; n + 1];
        let mut next = vec![false; n + 1];
        cur[0] = true;
        if tails {
            for (j, b) in text.iter().enumerate() {
                cur[j + 1] |= *b == b'/';
            }
        }
        for tok in &self.toks {
            next.iter_mut().for_each(|x| *x = false);
            match tok {
                Tok::Star | Tok::Stars => {
                    let mut on = false;
                    for j in 0..=n {
                        on |= cur[j];
                        next[j] = on;
                        if *tok == Tok::Star && j < n && text[j] == b'/' {
                            on = false;
                        }
                    }
                }
                _ => {
                    for j in 0..n {
                        if !cur[j] {
                            continue;
                        }
                        let b = text[j];
                        next[j + 1] = match tok {
                            Tok::Byte(c) => *c == b,
                            Tok::One => b != b'/',
                            Tok::Class(set) => {
                                b != b'/' && set[b as usize / 64] & (1 << (b % 64)) != 0
                            }
                            Tok::Star | Tok::Stars => false,
                        };
                    }
                }
            }
            std::mem::swap(&mut cur, &mut next);
            if !cur.iter().any(|x| *x) {
                return false;
            }
        }
        cur[n]
    }

    /// An upper bound of the work of matching a text of at most `len`
    /// bytes (in steps of the general matcher; the shapes compared
    /// without it count a step per 8 bytes).
    pub fn cost(&self, len: usize) -> u64 {
        self.cost_of(len, false)
    }

    /// [`Glob::cost`] of [`Glob::matches_tail`], whose shortcuts are
    /// those of a literal and of `*rest` only.
    pub fn tail_cost(&self, len: usize) -> u64 {
        self.cost_of(len, true)
    }

    fn cost_of(&self, len: usize, tails: bool) -> u64 {
        let literal = |t: &[Tok]| t.iter().all(|t| matches!(t, Tok::Byte(_)));
        let p = self.toks.len() as u64;
        let len = len as u64;
        if self.inert || literal(&self.toks) {
            return 1 + p / 8;
        }
        let star_rest = matches!(self.toks.split_first(), Some((Tok::Star, r)) if literal(r));
        let lead_star = matches!(self.toks.split_last(), Some((Tok::Star, l)) if literal(l));
        match (tails, star_rest, lead_star) {
            // Any tail: `*rest` is a comparison of the end.
            (true, true, _) => 1 + p / 8,
            (false, true, _) | (false, _, true) => 1 + (len + p) / 8,
            _ => (p + 1).saturating_mul(len + 1),
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the entry (and, for a directory, everything below) out.
    Exclude,
    /// Keep the entry; later rules are not consulted.
    Include,
}

/// One include or exclude rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    action: Action,
    glob: Glob,
    /// `dir/***`: the pattern without `/***` also matches a directory
    /// (only a directory: rsync matches `dir/***` against a file or
    /// symlink named `dir` as `dir/` would be, not at all).
    glob_dir: Option<Glob>,
    /// Matched against the path from the anchor, not the final name.
    whole_path: bool,
    /// Anchored: the path must begin at `prefix`.
    anchored: bool,
    /// Where an anchored rule's path starts (a per-directory file's
    /// directory, with a trailing `/`; empty at the root and for a rule
    /// that is not anchored): one copy shared by a file's rules.
    prefix: std::sync::Arc<[u8]>,
    negate: bool,
    dir_only: bool,
    /// Why the rule matches no path, as in rsync (a pattern of only `/`,
    /// an unterminated `[`): shown in a warning where it was read.
    pub inert: Option<String>,
}

impl Rule {
    fn new(
        action: Action,
        pat: &[u8],
        mods: &Mods,
        prefix: &std::sync::Arc<[u8]>,
    ) -> Result<Rule, String> {
        if pat.is_empty() {
            return Err("empty pattern".into());
        }
        let (pat, dir_only) = match pat.strip_suffix(b"/") {
            Some(p) if !p.is_empty() => (p, true),
            _ => (pat, false),
        };
        let (pat, anchored) = match pat.strip_prefix(b"/") {
            Some(p) => (p, true),
            None => (pat, false),
        };
        let mut rule = Rule {
            action,
            glob: Glob::nothing(),
            glob_dir: None,
            // `/` (absolute path) does not make a name-only pattern match
            // the whole path: rsync still compares it with the name.
            whole_path: anchored || pat.contains(&b'/') || pat.windows(2).any(|w| w == b"**"),
            anchored,
            // `/`: matched against the absolute path, so a per-directory
            // file's anchored rule starts at the root, not at its directory.
            prefix: if mods.abs || !anchored {
                std::sync::Arc::from(&b""[..])
            } else {
                prefix.clone()
            },
            negate: mods.negate,
            dir_only,
            inert: None,
        };
        // `/`, `//`: no path is empty, so rsync's rule matches nothing.
        if pat.iter().all(|b| *b == b'/') {
            rule.inert = Some("a pattern of only '/' matches no path".into());
            return Ok(rule);
        }
        let (glob, why) = Glob::lenient(pat);
        rule.glob = glob;
        rule.glob_dir = match pat.strip_suffix(b"/***") {
            Some(p) if !p.is_empty() => Some(Glob::lenient(p).0),
            _ => None,
        };
        rule.inert = why.map(|w| format!("{w}: rsync's pattern matching gives up on it"));
        Ok(rule)
    }

    /// An exclude rule for `pat` as rsync's `--exclude PATTERN` (and each
    /// line of `--exclude-from`) makes it: `- PATTERN`, no modifiers.
    pub fn exclude(pat: &[u8]) -> Result<Rule, String> {
        Rule::new(
            Action::Exclude,
            pat,
            &Mods::default(),
            &std::sync::Arc::from(&b""[..]),
        )
    }

    fn glob_matches(&self, text: &[u8], is_dir: bool) -> bool {
        self.glob.matches(text)
            || (is_dir && self.glob_dir.as_ref().is_some_and(|g| g.matches(text)))
    }

    /// Whether the rule applies to `rel` (path from the root, no leading
    /// `/`) whose final name starts at `name_at`.
    pub fn matches(&self, rel: &[u8], name_at: usize, is_dir: bool) -> bool {
        let hit = (!self.dir_only || is_dir) && self.pattern_matches(rel, name_at, is_dir);
        hit != self.negate
    }

    fn pattern_matches(&self, rel: &[u8], name_at: usize, is_dir: bool) -> bool {
        if !self.whole_path {
            return self.glob_matches(&rel[name_at.min(rel.len())..], is_dir);
        }
        if self.anchored {
            return rel
                .strip_prefix(&self.prefix[..])
                .is_some_and(|tail| self.glob_matches(tail, is_dir));
        }
        // Unanchored with a `/` or `**`: any tail starting at a component.
        self.glob.matches_tail(rel)
            || (is_dir && self.glob_dir.as_ref().is_some_and(|g| g.matches_tail(rel)))
    }

    /// An upper bound of the work of matching a path of at most `len`
    /// bytes (see [`Glob::cost`]).
    pub fn cost(&self, len: usize) -> u64 {
        // A final name is at most 255 bytes (NAME_MAX).
        let len = if self.whole_path { len } else { len.min(255) };
        let tails = self.whole_path && !self.anchored;
        let of = |g: &Glob| if tails { g.tail_cost(len) } else { g.cost(len) };
        let dir = self.glob_dir.as_ref().map_or(0, of);
        // An anchored rule first compares its directory's path.
        let prefix = 1 + self.prefix.len() as u64 / 8;
        of(&self.glob).saturating_add(dir).saturating_add(prefix)
    }
}

/// A `dir-merge` rule: the name of the per-directory file and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DirMerge {
    name: Vec<u8>,
    /// `-` or `+`: every line is a pattern of that action.
    only: Option<Action>,
    /// `n`: the rules apply in the file's directory only.
    no_inherit: bool,
    /// `e`: the per-directory file itself is excluded.
    exclude_self: bool,
    /// `dir-merge /NAME` (rsync's `-F`): also read in `/` and every
    /// directory above each source.
    from_root: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Rule(Rule),
    DirMerge(usize),
}

/// The parsed rules, in order; first match wins.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    items: Vec<Item>,
    merges: Vec<DirMerge>,
    /// Notes about rules that have no effect on a backup (shown as warnings).
    pub notes: Vec<String>,
    /// A `!` (clear) in the file or a file it merges: as in rsync, where
    /// 1.x's excludes came before the merged filter in one list, the
    /// excludes are dropped too.
    pub clears_excludes: bool,
}

/// Modifiers of one rule.
#[derive(Debug, Default)]
struct Mods {
    abs: bool,
    negate: bool,
    /// `r`: the rule applies on the receiving side.
    receiver: bool,
    /// `s`: the rule applies on the sending side.
    sender: bool,
    only: Option<Action>,
    no_inherit: bool,
    exclude_self: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Include,
    Exclude,
    Hide,
    Show,
    Protect,
    Risk,
    Clear,
    Merge,
    DirMerge,
}

const LONG: &[(&str, Kind)] = &[
    ("include", Kind::Include),
    ("exclude", Kind::Exclude),
    ("hide", Kind::Hide),
    ("show", Kind::Show),
    ("protect", Kind::Protect),
    ("risk", Kind::Risk),
    ("clear", Kind::Clear),
    ("merge", Kind::Merge),
    ("dir-merge", Kind::DirMerge),
];

fn short(c: u8) -> Option<Kind> {
    Some(match c {
        b'+' => Kind::Include,
        b'-' => Kind::Exclude,
        b'H' => Kind::Hide,
        b'S' => Kind::Show,
        b'P' => Kind::Protect,
        b'R' => Kind::Risk,
        b'!' => Kind::Clear,
        b'.' => Kind::Merge,
        b':' => Kind::DirMerge,
        _ => return None,
    })
}

/// Splits a rule line into its kind, modifier bytes and argument.
fn split_rule(line: &[u8]) -> Result<(Kind, &[u8], &[u8]), String> {
    let (kind, rest) = LONG
        .iter()
        .find_map(|(name, k)| {
            let rest = line.strip_prefix(name.as_bytes())?;
            matches!(rest.first(), None | Some(b' ' | b'_' | b',')).then_some((*k, rest))
        })
        .or_else(|| short(line[0]).map(|k| (k, &line[1..])))
        .ok_or_else(|| {
            let word = line.split(|b| *b == b' ').next().unwrap_or(line);
            if word == b"C" || word == b"cvs-exclude" {
                return "rule C (rsync's cvs-exclude: CVS's built-in list of names, and \
                        .cvsignore files) is not supported: write the excludes it stands for \
                        out as - rules"
                    .to_string();
            }
            format!(
                "unknown rule \"{}\" (supported: + - include exclude merge . dir-merge : \
                 hide H show S protect P risk R clear !)",
                line.split(|b| *b == b' ')
                    .next()
                    .unwrap_or(line)
                    .escape_ascii()
            )
        })?;
    // `exclude,MODS` / `-,MODS`: the comma is optional after a short name.
    let rest = rest.strip_prefix(b",").unwrap_or(rest);
    // Modifiers run up to the separator: one space or one underscore.
    let end = rest
        .iter()
        .position(|b| *b == b' ' || *b == b'_')
        .unwrap_or(rest.len());
    let (mods, arg) = (&rest[..end], rest.get(end + 1..).unwrap_or(b""));
    Ok((kind, mods, arg))
}

fn parse_mods(kind: Kind, mods: &[u8]) -> Result<Mods, String> {
    let mut m = Mods::default();
    for &c in mods {
        let ok = match (kind, c) {
            (Kind::Include | Kind::Exclude | Kind::Hide | Kind::Show, b'/') => {
                m.abs = true;
                true
            }
            (Kind::Include | Kind::Exclude | Kind::Hide | Kind::Show, b'!') => {
                m.negate = true;
                true
            }
            (Kind::Include | Kind::Exclude, b's') => {
                m.sender = true;
                true
            }
            (Kind::Include | Kind::Exclude, b'r') => {
                m.receiver = true;
                true
            }
            (Kind::Merge | Kind::DirMerge, b'-') => {
                m.only = Some(Action::Exclude);
                true
            }
            (Kind::Merge | Kind::DirMerge, b'+') => {
                m.only = Some(Action::Include);
                true
            }
            (Kind::DirMerge, b'n') => {
                m.no_inherit = true;
                true
            }
            (Kind::DirMerge, b'e') => {
                m.exclude_self = true;
                true
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "modifier {:?} is not supported on this rule",
                c as char
            ));
        }
    }
    Ok(m)
}

/// Where rules being parsed go, and what they may contain.
struct Sink<'a> {
    rules: &'a mut Vec<Item>,
    notes: &'a mut Vec<String>,
    /// `Some` while parsing the global list (merge and dir-merge allowed).
    merges: Option<&'a mut Vec<DirMerge>>,
    /// Anchor of the rules (a per-directory file's directory).
    prefix: &'a std::sync::Arc<[u8]>,
    /// Set when a per-directory file clears the inherited rules.
    cleared: bool,
}

impl Sink<'_> {
    /// Adds `rule` (from `line`, line `n` of `file`); one that matches no
    /// path, as in rsync, is named in a note.
    fn push_rule(&mut self, rule: Rule, file: &Path, n: usize, line: &[u8]) {
        if let Some(why) = &rule.inert {
            self.notes.push(format!(
                "{}:{n}: \"{}\": {why}; the rule matches no path{}, as with rsync",
                file.as_os_str().as_bytes().escape_ascii(),
                line.escape_ascii(),
                if rule.negate {
                    " (so with '!', every path)"
                } else {
                    ""
                }
            ));
        }
        self.rules.push(Item::Rule(rule));
    }
}

fn err(file: &Path, line: usize, message: impl Into<String>) -> FilterError {
    FilterError {
        file: file.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads a global filter file (or one it merges) by path.
fn read_file(path: &Path) -> Result<Vec<u8>, FilterError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| err(path, 0, e.to_string()))?;
    let mut buf = vec![];
    f.take(MAX_FILTER_FILE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(path, 0, e.to_string()))?;
    if buf.len() > MAX_FILTER_FILE {
        return Err(err(path, 0, format!("larger than {MAX_FILTER_FILE} bytes")));
    }
    Ok(buf)
}

/// The patterns of an exclude file as rsync's `--exclude-from` reads them,
/// each with its line number (1-based): lines end at `\n` or `\r`, are
/// not trimmed (a pattern may start or end with a space), and empty lines
/// and those starting with `#` or `;` are skipped.
pub fn exclude_file_lines(text: &[u8]) -> Vec<(usize, &[u8])> {
    text.split(|b| *b == b'\n')
        .enumerate()
        .flat_map(|(i, line)| line.split(|b| *b == b'\r').map(move |l| (i + 1, l)))
        .filter(|(_, l)| !l.is_empty() && l[0] != b'#' && l[0] != b';')
        .collect()
}

/// Parses the lines of `text` (from `file`) into `sink`.
fn parse_lines(
    text: &[u8],
    file: &Path,
    only: Option<Action>,
    depth: usize,
    sink: &mut Sink<'_>,
) -> Result<(), FilterError> {
    for (i, line) in text.split(|b| *b == b'\n' || *b == b'\r').enumerate() {
        let n = i + 1;
        if line.is_empty() || line[0] == b'#' || line[0] == b';' {
            continue;
        }
        if line.len() > MAX_LINE {
            return Err(err(file, n, format!("line longer than {MAX_LINE} bytes")));
        }
        if sink.rules.len() > 100_000 {
            return Err(err(file, n, "more than 100000 rules"));
        }
        parse_line(line, file, n, only, depth, sink)?;
    }
    Ok(())
}

/// Parses one rule line. Over 80 lines: one arm per rule form rsync
/// accepts, kept together so the grammar reads in one place.
fn parse_line(
    line: &[u8],
    file: &Path,
    n: usize,
    only: Option<Action>,
    depth: usize,
    sink: &mut Sink<'_>,
) -> Result<(), FilterError> {
    let shown = || line.escape_ascii().to_string();
    if let Some(action) = only {
        // A `merge,-`/`dir-merge,-` file: each line is a pattern, `!`
        // included (rsync parses no rule there, clear neither).
        let rule = Rule::new(action, line, &Mods::default(), sink.prefix)
            .map_err(|m| err(file, n, format!("{}: {m}", shown())))?;
        sink.push_rule(rule, file, n, line);
        return Ok(());
    }
    let (kind, mods, arg) = split_rule(line).map_err(|m| err(file, n, m))?;
    let mods = parse_mods(kind, mods).map_err(|m| err(file, n, format!("{}: {m}", shown())))?;
    let what = |m: &str| err(file, n, format!("{}: {m}", shown()));
    match kind {
        Kind::Clear => {
            if !arg.is_empty() {
                return Err(what("'!' (clear) takes no pattern"));
            }
            sink.rules.clear();
            sink.cleared = true;
        }
        Kind::Protect | Kind::Risk => {
            sink.notes.push(format!(
                "{}:{n}: \"{}\" has no effect: protect/risk rules only shield files on the \
                 receiving side from rsync's --delete; byteback's server keeps every \
                 snapshot whole, and what is sent is decided by the other rules",
                file.as_os_str().as_bytes().escape_ascii(),
                shown()
            ));
        }
        Kind::Include | Kind::Exclude | Kind::Hide | Kind::Show => {
            let action = match kind {
                Kind::Include | Kind::Show => Action::Include,
                _ => Action::Exclude,
            };
            // `r` alone: the receiving side only. `rs`: both sides, so
            // it decides what is sent as a plain rule does.
            if mods.receiver && !mods.sender {
                sink.notes.push(format!(
                    "{}:{n}: \"{}\" has no effect: a receiver-side ('r') rule does not \
                     decide what is sent",
                    file.as_os_str().as_bytes().escape_ascii(),
                    shown()
                ));
                return Ok(());
            }
            let rule = Rule::new(action, arg, &mods, sink.prefix).map_err(|m| what(&m))?;
            sink.push_rule(rule, file, n, line);
        }
        Kind::Merge => {
            if sink.merges.is_none() {
                return Err(what("merge is not supported inside a per-directory file"));
            }
            if depth >= MAX_MERGE_DEPTH {
                return Err(what(&format!(
                    "merge nested more than {MAX_MERGE_DEPTH} deep (a loop?)"
                )));
            }
            if arg.is_empty() {
                return Err(what("merge needs a file name"));
            }
            let p = Path::new(std::ffi::OsStr::from_bytes(arg));
            // Relative names are taken from the merging file's directory.
            let path = match file.parent() {
                Some(dir) if p.is_relative() => dir.join(p),
                _ => p.to_path_buf(),
            };
            let text = read_file(&path).map_err(|e| what(&e.to_string()))?;
            parse_lines(&text, &path, mods.only, depth + 1, sink)?;
        }
        Kind::DirMerge => {
            let Some(merges) = sink.merges.as_deref_mut() else {
                return Err(what(
                    "dir-merge is not supported inside a per-directory file",
                ));
            };
            let (name, from_root) = match arg.strip_prefix(b"/") {
                Some(n) => (n, true),
                None => (arg, false),
            };
            if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
                return Err(what(
                    "dir-merge takes a plain file name (such as .rsync-filter), \
                     looked for in every directory, or /NAME, looked for from / down",
                ));
            }
            if merges.len() >= MAX_DIR_MERGES {
                return Err(what(&format!("more than {MAX_DIR_MERGES} dir-merge rules")));
            }
            merges.push(DirMerge {
                name: name.to_vec(),
                only: mods.only,
                no_inherit: mods.no_inherit,
                exclude_self: mods.exclude_self,
                from_root,
            });
            let k = merges.len() - 1;
            sink.rules.push(Item::DirMerge(k));
        }
    }
    Ok(())
}

impl Filter {
    /// Reads and parses a filter file (`merge` rules in it are read too).
    pub fn load(path: &Path) -> Result<Filter, FilterError> {
        let text = read_file(path)?;
        Self::parse(&text, path)
    }

    /// Parses filter rules; `file` names them in errors and is where
    /// relative `merge` names are taken from.
    pub fn parse(text: &[u8], file: &Path) -> Result<Filter, FilterError> {
        let mut f = Filter::default();
        let mut sink = Sink {
            rules: &mut f.items,
            notes: &mut f.notes,
            merges: Some(&mut f.merges),
            prefix: &std::sync::Arc::from(&b""[..]),
            cleared: false,
        };
        parse_lines(text, file, None, 0, &mut sink)?;
        let cleared = sink.cleared;
        f.clears_excludes = cleared;
        Ok(f)
    }

    /// Appends an exclude rule for each of `patterns` after every rule,
    /// as rsync took `--exclude`s given after `--filter` (1.x's
    /// `rsync_flags`); `file` names them in errors.
    pub fn append_excludes(&mut self, patterns: &[String], file: &Path) -> Result<(), FilterError> {
        let mut text = Vec::new();
        for p in patterns {
            text.extend_from_slice(b"- ");
            text.extend_from_slice(p.as_bytes());
            text.push(b'\n');
        }
        let more = Filter::parse(&text, file)?;
        debug_assert!(more.merges.is_empty());
        self.items.extend(more.items);
        self.notes.extend(more.notes);
        Ok(())
    }

    /// Escapes `name` so that, as a pattern, it matches exactly itself: a
    /// name without `*?[` is a literal pattern already (its backslashes
    /// too); otherwise each `*?[\\` gets a backslash.
    pub fn escape(name: &str) -> String {
        if !name.contains(['*', '?', '[']) {
            return name.to_string();
        }
        let mut out = String::with_capacity(name.len() + 4);
        for c in name.chars() {
            if matches!(c, '*' | '?' | '[' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The `dir-merge` rules still in the list (a `!` may have dropped
    /// some): their numbers and the names of the per-directory files to read
    /// in each directory.
    pub fn dir_merges(&self) -> Vec<(usize, &[u8])> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::DirMerge(k) => Some((*k, self.merges[*k].name.as_slice())),
                Item::Rule(_) => None,
            })
            .collect()
    }

    /// The `dir-merge` rules among [`Filter::dir_merges`] whose files are
    /// also read in the directories above each source, as rsync
    /// `--relative` reads them in the parents of the transfer: all of them,
    /// `/` included for `dir-merge /NAME` only.
    pub fn dir_merges_above(&self) -> Vec<AboveScan<'_>> {
        self.dir_merges()
            .into_iter()
            .map(|(k, name)| AboveScan {
                merge: k,
                name,
                in_root: self.merges[k].from_root,
                no_inherit: self.merges[k].no_inherit,
            })
            .collect()
    }

    /// The first matching rule's action for `rel` (path from the root, no
    /// leading `/`), found in the directory at walk depth `depth` (whose
    /// per-directory rules are in `dirs`); `None` if no rule matches.
    pub fn check(&self, dirs: &DirRules, rel: &[u8], is_dir: bool, depth: usize) -> Option<Action> {
        let name_at = rel.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
        for item in &self.items {
            match item {
                Item::Rule(r) => {
                    if r.matches(rel, name_at, is_dir) {
                        return Some(r.action);
                    }
                }
                Item::DirMerge(k) => {
                    let m = &self.merges[*k];
                    if m.exclude_self && &rel[name_at..] == m.name.as_slice() {
                        return Some(Action::Exclude);
                    }
                    // Newest directory first; a file that cleared stops the inheritance.
                    for frame in dirs.frames.iter().rev().filter(|f| f.merge == *k) {
                        if frame.depth == depth || !m.no_inherit {
                            for r in &frame.rules {
                                if r.matches(rel, name_at, is_dir) {
                                    return Some(r.action);
                                }
                            }
                        }
                        if frame.cleared {
                            break;
                        }
                    }
                }
            }
        }
        None
    }
}

/// A `dir-merge` rule's file to read above a source ([`Filter::dir_merges_above`]).
#[derive(Debug, Clone, Copy)]
pub struct AboveScan<'a> {
    /// The rule's number, for [`DirRules::enter`].
    pub merge: usize,
    /// The per-directory file's name.
    pub name: &'a [u8],
    /// Read in `/` too (`dir-merge /NAME`).
    pub in_root: bool,
    /// `n`: its rules hold in the file's directory only.
    pub no_inherit: bool,
}

/// Rules read from one per-directory file.
#[derive(Debug)]
struct Frame {
    merge: usize,
    depth: usize,
    rules: Vec<Rule>,
    cleared: bool,
    /// Bytes of the file read (counted against [`MAX_DIR_RULES_HELD`]).
    size: usize,
    /// Only root could have written the file ([`DirRules::trust_last`]).
    trusted: bool,
}

/// The per-directory rules of the directories being walked, one frame per
/// file read, dropped when the walk leaves the directory.
#[derive(Debug, Default)]
pub struct DirRules {
    frames: Vec<Frame>,
    held: usize,
}

impl DirRules {
    /// Adds the rules of the per-directory file for `dir-merge` number
    /// `merge` (its contents `text`, found at `file`) of the directory `dir`
    /// (path from the root, no leading `/`) at walk depth `depth`. Returns
    /// notes on rules that have no effect (to be shown as warnings).
    pub fn enter(
        &mut self,
        filter: &Filter,
        merge: usize,
        depth: usize,
        dir: &[u8],
        text: &[u8],
        file: &Path,
    ) -> Result<Vec<String>, FilterError> {
        let m = filter
            .merges
            .get(merge)
            .ok_or_else(|| err(file, 0, "no such dir-merge rule"))?;
        if text.len() > MAX_DIR_FILE {
            return Err(err(file, 0, format!("larger than {MAX_DIR_FILE} bytes")));
        }
        if self.held + text.len() > MAX_DIR_RULES_HELD {
            return Err(err(
                file,
                0,
                format!(
                    "the per-directory filter files along this path hold more than \
                     {MAX_DIR_RULES_HELD} bytes"
                ),
            ));
        }
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let prefix: std::sync::Arc<[u8]> = prefix.into();
        let mut items = vec![];
        let mut notes = vec![];
        let mut sink = Sink {
            rules: &mut items,
            notes: &mut notes,
            merges: None,
            prefix: &prefix,
            cleared: false,
        };
        parse_lines(text, file, m.only, MAX_MERGE_DEPTH, &mut sink)?;
        let cleared = sink.cleared;
        let rules: Vec<Rule> = items
            .into_iter()
            .filter_map(|i| match i {
                Item::Rule(r) => Some(r),
                Item::DirMerge(_) => None,
            })
            .collect();
        // What the rules hold, not only their text: a line of 2 bytes
        // (`a\n`) makes a rule of about 150.
        let size = text.len() + rules.len() * RULE_HELD;
        if self.held + size > MAX_DIR_RULES_HELD {
            return Err(err(
                file,
                0,
                format!(
                    "the per-directory filter files along this path hold more than \
                     {MAX_DIR_RULES_HELD} bytes of rules"
                ),
            ));
        }
        self.held += size;
        self.frames.push(Frame {
            merge,
            depth,
            rules,
            cleared,
            size,
            trusted: false,
        });
        Ok(notes)
    }

    /// Marks the file [`DirRules::enter`] read last as one only root could
    /// have written: its rules' cost is the admin's choice, not counted
    /// by [`DirRules::untrusted_cost`].
    pub fn trust_last(&mut self) {
        if let Some(f) = self.frames.last_mut() {
            f.trusted = true;
        }
    }

    /// An upper bound of the work of matching one entry of at most `len`
    /// bytes of path, in the directory at walk depth `depth`, against the
    /// rules of the per-directory files others than root could have
    /// written (see [`Glob::cost`]): what a user's rules can make every
    /// entry below them cost.
    pub fn untrusted_cost(&self, filter: &Filter, depth: usize, len: usize) -> u64 {
        (self.frames.iter())
            .filter(|f| !f.trusted)
            .filter(|f| {
                f.depth == depth || !filter.merges.get(f.merge).is_some_and(|m| m.no_inherit)
            })
            .flat_map(|f| &f.rules)
            .fold(0u64, |sum, r| sum.saturating_add(r.cost(len)))
    }

    /// Drops the rules of directories at `depth` and deeper.
    pub fn leave(&mut self, depth: usize) {
        while self.frames.last().is_some_and(|f| f.depth >= depth) {
            if let Some(f) = self.frames.pop() {
                self.held -= f.size;
            }
        }
    }

    /// Number of per-directory files whose rules are held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no per-directory rules are held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    thread_local! {
        /// Steps [`Glob::nfa`] took on this thread.
        pub(super) static NFA_STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn g(p: &str) -> Glob {
        Glob::new(p.as_bytes()).unwrap()
    }

    /// The one-pass match of any tail starting at a component agrees with
    /// matching each such tail on its own, for patterns of every shape.
    #[test]
    fn a_match_of_any_tail_is_a_match_of_one_of_them() {
        let pats = [
            "a/b", "b", "*/b", "*", "*b", "a*", "a/*", "**/b", "a/**", "?/b", "[ab]/*b", "*/*",
            "a**b", "**", "*a*a*", "b/", "/b",
        ];
        let mut seed = 7u64;
        let mut texts = vec![String::new(), "/".into(), "b".into(), "a/b".into()];
        for _ in 0..400 {
            let mut t = String::new();
            for _ in 0..(seed >> 60) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t.push(['a', 'b', '/', 'c'][(seed >> 62) as usize]);
            }
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            texts.push(t);
        }
        for p in pats {
            let glob = g(p);
            for t in &texts {
                let t = t.as_bytes();
                let brute = glob.matches(t)
                    || (0..t.len()).any(|i| t[i] == b'/' && glob.matches(&t[i + 1..]));
                assert_eq!(
                    glob.matches_tail(t),
                    brute,
                    "{p} against {}",
                    t.escape_ascii()
                );
            }
        }
    }

    /// The cost a rule is charged bounds the steps its matching takes,
    /// whatever the pattern's shape, anchoring and the path (a `prefix*`
    /// pattern with a `/` once went to the general matcher charged as a
    /// shortcut).
    #[test]
    fn the_cost_charged_bounds_the_matchers_steps() {
        let pats = [
            "a/b*", "a/a/a/b*", "b*", "*b", "a/*b", "**/b", "a*b*c", "/a*", "/a/b*", "x/",
            "[ab]*/c", "a/**/b*", "dir/***", "/dir/***", "?/?",
        ];
        let texts: Vec<Vec<u8>> = [1usize, 5, 40, 300, 2000]
            .iter()
            .map(|&n| (0..n).map(|i| [b'a', b'/', b'b', b'a'][i % 4]).collect())
            .collect();
        let prefix: std::sync::Arc<[u8]> = std::sync::Arc::from(&b"a/"[..]);
        for p in pats {
            for prefixed in [false, true] {
                let at: std::sync::Arc<[u8]> = if prefixed {
                    prefix.clone()
                } else {
                    std::sync::Arc::from(&b""[..])
                };
                let r = Rule::new(Action::Exclude, p.as_bytes(), &Mods::default(), &at).unwrap();
                for t in &texts {
                    let name_at = t.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
                    for dir in [false, true] {
                        NFA_STEPS.with(|c| c.set(0));
                        r.matches(t, name_at, dir);
                        let steps = NFA_STEPS.with(|c| c.get());
                        let cost = r.cost(t.len());
                        assert!(
                            steps <= cost,
                            "{p} over {} bytes: {steps} steps, charged {cost}",
                            t.len()
                        );
                    }
                }
            }
        }
    }

    /// What a rule may cost grows with the path for wildcard patterns
    /// only; a name is at most 255 bytes; `untrusted_cost` counts the
    /// files not marked as root's, inherited or in their own directory.
    #[test]
    fn the_cost_of_matching_is_bounded_by_shape_and_trust() {
        let lit = Rule::exclude(b"some/name").unwrap();
        assert_eq!(lit.cost(10), lit.cost(4000));
        let ext = Rule::exclude(b"*.o").unwrap();
        assert!(ext.cost(4000) < 600 && ext.cost(4000) > ext.cost(10));
        let wild = Rule::exclude(b"a*b*c").unwrap();
        assert_eq!(wild.cost(4000), wild.cost(255), "a name: 255 bytes at most");
        assert_eq!(wild.cost(255), 6 * 256 + 1);
        let deep = Rule::exclude(b"**/a*b*c").unwrap();
        assert_eq!(deep.cost(4000), 8 * 4001 + 1);
        let tree = Rule::exclude(b"x*/***").unwrap();
        assert!(
            tree.cost(100) > g("x*/***").cost(100),
            "and its directory form"
        );

        let f = parse(": .rsync-filter\n:n .here\n");
        let mut d = DirRules::default();
        let file = Path::new("/top/.rsync-filter");
        d.enter(&f, 0, 1, b"top", b"- **/a*b*c\n", file).unwrap();
        assert_eq!(d.untrusted_cost(&f, 1, 100), 8 * 101 + 1);
        d.trust_last();
        assert_eq!(d.untrusted_cost(&f, 1, 100), 0, "root's file");
        d.enter(&f, 0, 2, b"top/u", b"- **/a*b*c\n", file).unwrap();
        d.enter(&f, 1, 2, b"top/u", b"- **/x*y\n", file).unwrap();
        assert_eq!(d.untrusted_cost(&f, 2, 100), (8 * 101 + 1) + (6 * 101 + 1));
        assert_eq!(
            d.untrusted_cost(&f, 3, 100),
            8 * 101 + 1,
            "an n rule's file holds in its own directory only"
        );
    }

    #[test]
    fn wildcards_follow_rsync() {
        assert!(g("*.tmp").matches(b"a.tmp"));
        assert!(!g("*.tmp").matches(b"d/a.tmp"));
        assert!(g("**.tmp").matches(b"d/a.tmp"));
        assert!(g("a?c").matches(b"abc"));
        assert!(!g("a?c").matches(b"a/c"));
        assert!(g("[a-c]x").matches(b"bx"));
        assert!(!g("[!a-c]x").matches(b"bx"));
        assert!(g("[^a-c]x").matches(b"dx"));
        assert!(!g("[^a-c]x").matches(b"/x"));
        assert!(g("[]]").matches(b"]"));
        assert!(g("[[:digit:]]*").matches(b"7up"));
        assert!(g("a\\*b").matches(b"a*b"));
        assert!(!g("a\\*b").matches(b"axb"));
        assert!(g("x/**").matches(b"x/y/z"));
        assert!(
            !g("x/**/z").matches(b"x/z"),
            "rsync: ** does not match zero dirs here"
        );
        // No wildcard: literal, backslash included.
        assert!(g("a\\b").matches(b"a\\b"));
        assert!(g("").matches(b""));
        assert!(Glob::new(b"[abc").is_err());
        assert!(Glob::new(b"[[:nope:]]").is_err());
        // Non-UTF-8 bytes.
        assert!(g("caf\u{e9}*").matches("caf\u{e9}s".as_bytes()));
        assert!(Glob::new(b"\xff*").unwrap().matches(b"\xff\xfe"));
        // The shortcuts agree with the general matcher.
        for (pat, yes, no) in [
            ("*.o", &["a.o", ".o"][..], &["a.oo", "d/a.o", "o"][..]),
            ("lib*", &["lib", "libc.so"], &["xlib", "lib/x"]),
            ("*", &["", "abc"], &["a/b"]),
            // A `/` in the literal tail: `*` still matches none.
            ("*/x", &["d/x", "/x"], &["d/e/x", "x", "d/xx"]),
            ("*oo/x", &["foo/x", "oo/x"], &["f/oo/x", "foo/y"]),
        ] {
            let glob = g(pat);
            for t in yes {
                assert!(glob.matches(t.as_bytes()), "{pat} {t}");
            }
            for t in no {
                assert!(!glob.matches(t.as_bytes()), "{pat} {t}");
            }
        }
    }

    fn parse(s: &str) -> Filter {
        Filter::parse(s.as_bytes(), Path::new("/etc/byteback/rsync_filter")).unwrap()
    }

    fn parse_err(s: &str) -> FilterError {
        Filter::parse(s.as_bytes(), Path::new("/etc/byteback/rsync_filter")).unwrap_err()
    }

    fn check(f: &Filter, rel: &str, dir: bool) -> Option<Action> {
        f.check(&DirRules::default(), rel.as_bytes(), dir, 1)
    }

    use Action::{Exclude as X, Include as I};

    /// A `!` in the filter clears the excludes too, as 1.x's README says
    /// ("resets everything"): rsync had them in the same list, before it.
    #[test]
    fn a_clear_in_the_filter_clears_the_excludes() {
        assert!(parse("- a\n!\n+ b\n").clears_excludes);
        assert!(parse("clear\n").clears_excludes);
        assert!(!parse("- a\n+ b\n").clears_excludes);
    }

    #[test]
    fn first_matching_rule_wins_and_patterns_match_names_or_tails() {
        let f = parse(
            "# comment\n; another\n\n+ /home/keep.tmp\n- *.tmp\ninclude /var/log/\n\
             exclude /var/*\n- cache/\n- a/b\n+ **/x**\n- /**/deep\n",
        );
        assert_eq!(check(&f, "home/keep.tmp", false), Some(I));
        assert_eq!(check(&f, "home/other.tmp", false), Some(X));
        assert_eq!(check(&f, "x.tmp", false), Some(X));
        assert_eq!(check(&f, "var/log", true), Some(I));
        assert_eq!(
            check(&f, "var/log", false),
            Some(X),
            "trailing / = dirs only"
        );
        assert_eq!(check(&f, "var/lib", true), Some(X));
        assert_eq!(check(&f, "srv/var/lib", true), None, "anchored at the root");
        assert_eq!(check(&f, "u/cache", true), Some(X));
        assert_eq!(check(&f, "u/cache", false), None);
        assert_eq!(check(&f, "z/a/b", false), Some(X), "tail match");
        assert_eq!(check(&f, "xa/b", false), None, "at a component boundary");
        assert_eq!(check(&f, "q/r/xyz/w", false), Some(I));
        assert_eq!(check(&f, "q/r/deep", false), Some(X));
        assert_eq!(check(&f, "deep", false), None, "/**/deep needs a dir");
        assert_eq!(check(&f, "srv/plain", false), None);
    }

    #[test]
    fn modifiers_triple_star_and_clear() {
        let f = parse("-! */\n");
        assert_eq!(
            check(&f, "a/file", false),
            Some(X),
            "negated dir-only excludes files"
        );
        assert_eq!(check(&f, "a/dir", true), None);
        let f = parse("- /srv/***\n+/ /etc/x\n- etc/x\n");
        assert_eq!(check(&f, "srv", true), Some(X));
        assert_eq!(check(&f, "srv/a/b", false), Some(X));
        assert_eq!(check(&f, "srvx", false), None);
        assert_eq!(check(&f, "etc/x", false), Some(I));
        assert_eq!(check(&f, "a/etc/x", false), Some(X));
        let f = parse("- a\n!\n- b\nclear\n+ c\n");
        assert_eq!(check(&f, "a", false), None);
        assert_eq!(check(&f, "b", false), None);
        assert_eq!(check(&f, "c", false), Some(I));
        let f = parse("H secret\nS shown\n-_under\nexclude,! keep*\n+s y\n");
        assert_eq!(
            check(&f, "d/secret", false),
            Some(X),
            "hide = sender-side exclude"
        );
        assert_eq!(check(&f, "d/shown", false), Some(I));
        assert_eq!(check(&f, "under", false), Some(X));
        assert_eq!(check(&f, "other", false), Some(X), "exclude,! keep*");
        assert_eq!(check(&f, "keepme", false), None);
    }

    #[test]
    fn protect_and_risk_are_noted_not_applied() {
        let f = parse("P /var/x\nprotect y\nR z\n-r w\n- v\n");
        assert_eq!(f.notes.len(), 4, "{:?}", f.notes);
        assert!(f.notes[0].contains("rsync_filter:1") && f.notes[0].contains("--delete"));
        assert_eq!(check(&f, "var/x", false), None);
        assert_eq!(check(&f, "w", false), None);
        assert_eq!(check(&f, "v", false), Some(X));
    }

    #[test]
    fn unsupported_rules_name_file_and_line() {
        for (text, line, what) in [
            ("- a\nfoo bar\n", 2, "unknown rule"),
            ("- a\n\n-C x\n", 3, "modifier 'C'"),
            ("-p x\n", 1, "modifier 'p'"),
            (" - indented\n", 1, "unknown rule"),
            ("- a\nC\n", 2, "cvs-exclude"),
            ("dir-merge sub/.f\n", 1, "plain file name"),
            ("dir-merge /sub/.f\n", 1, "plain file name"),
            (": /\n", 1, "plain file name"),
            (":w .f\n", 1, "modifier 'w'"),
            ("- \n", 1, "empty pattern"),
            ("! x\n", 1, "takes no pattern"),
            (
                "merge /nonexistent/byteback-filter-test\n",
                1,
                "nonexistent",
            ),
            ("L x\n", 1, "unknown rule"),
        ] {
            let e = parse_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(what), "{text:?}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("/etc/byteback/rsync_filter:{line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn merge_reads_files_relative_to_the_merging_one_and_stops_loops() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("more"), "- *.bak\n+ keep\n").unwrap();
        std::fs::write(d.path().join("plain"), "*.o\nbuild/\n").unwrap();
        std::fs::write(d.path().join("loop"), "merge loop\n").unwrap();
        std::fs::write(d.path().join("bad"), "- ok\n?? x\n").unwrap();
        let main = d.path().join("main");
        std::fs::write(&main, "merge more\n.- plain\n- keep\n").unwrap();
        let f = Filter::load(&main).unwrap();
        assert_eq!(check(&f, "a.bak", false), Some(X));
        assert_eq!(
            check(&f, "keep", false),
            Some(I),
            "merged rules come in place"
        );
        assert_eq!(check(&f, "x.o", false), Some(X));
        assert_eq!(check(&f, "build", true), Some(X));
        std::fs::write(&main, "merge loop\n").unwrap();
        assert!(Filter::load(&main)
            .unwrap_err()
            .to_string()
            .contains("deep"));
        std::fs::write(&main, "merge bad\n").unwrap();
        let e = Filter::load(&main).unwrap_err();
        assert_eq!(e.file, d.path().join("bad"));
        assert_eq!(e.line, 2);
        std::fs::write(&main, vec![b'#'; MAX_FILTER_FILE + 1]).unwrap();
        assert!(Filter::load(&main)
            .unwrap_err()
            .to_string()
            .contains("larger"));
    }

    /// `dir/***` matches the name itself only when it is a directory: a
    /// file or symlink named `dir` is kept, as rsync keeps it (it was
    /// silently left out of the backup).
    #[test]
    fn triple_star_matches_a_directory_of_that_name_but_not_a_file() {
        let f = parse("- regfile/***\n- /top/anch/***\n");
        assert_eq!(check(&f, "d/regfile", false), None, "a file is kept");
        assert_eq!(check(&f, "d/regfile", true), Some(X));
        assert_eq!(check(&f, "d/regfile/x", false), Some(X));
        assert_eq!(check(&f, "top/anch", false), None);
        assert_eq!(check(&f, "top/anch", true), Some(X));
        assert_eq!(check(&f, "top/anch/y", false), Some(X));
    }

    /// In a `merge,-` file every line is a pattern: `!` is the name `!`,
    /// not a clear that would drop the rules before it.
    #[test]
    fn a_bang_in_an_exclude_only_file_is_a_pattern() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("plain"), "a\n!\nb\n").unwrap();
        let main = d.path().join("main");
        std::fs::write(&main, "- first\n.- plain\n").unwrap();
        let f = Filter::load(&main).unwrap();
        assert!(!f.clears_excludes);
        assert_eq!(check(&f, "first", false), Some(X));
        assert_eq!(check(&f, "x/a", false), Some(X));
        assert_eq!(check(&f, "x/!", false), Some(X));
        assert_eq!(check(&f, "x/b", false), Some(X));
        // The same in a `dir-merge,-` file.
        let f = parse("- first\ndir-merge,- .ex\n");
        let mut d = DirRules::default();
        let file = Path::new("/top/.ex");
        d.enter(&f, 0, 1, b"top", b"a\n!\nb\n", file).unwrap();
        assert_eq!(f.check(&d, b"top/a", false, 1), Some(X));
        assert_eq!(f.check(&d, b"top/!", false, 1), Some(X));
        assert_eq!(f.check(&d, b"first", false, 1), Some(X));
    }

    /// `/` (absolute path) does not anchor a pattern that does not start
    /// with `/`: rsync still matches a name-only pattern with the name, and
    /// one with a `/` with the end of the path. In a per-directory file an
    /// anchored `/` rule starts at the root, not at the file's directory.
    #[test]
    fn the_absolute_modifier_anchors_only_a_leading_slash() {
        let f = parse("-/ a\n-/ tree/b\n-/ /top/c\n");
        assert_eq!(check(&f, "x/y/a", false), Some(X));
        assert_eq!(check(&f, "a", false), Some(X));
        assert_eq!(check(&f, "x/tree/b", false), Some(X));
        assert_eq!(check(&f, "x/tree/bb", false), None);
        assert_eq!(check(&f, "top/c", false), Some(X));
        assert_eq!(check(&f, "x/top/c", false), None);
        let f = parse(": .f\n");
        let mut d = DirRules::default();
        let file = Path::new("/top/.f");
        d.enter(&f, 0, 1, b"top", b"-/ /top/c\n- /d\n", file)
            .unwrap();
        assert_eq!(f.check(&d, b"top/c", false, 1), Some(X));
        assert_eq!(f.check(&d, b"top/d", false, 1), Some(X));
        assert_eq!(f.check(&d, b"top/top/c", false, 2), None);
    }

    /// `rs`: both sides, so the sender applies it; `r` alone does not.
    #[test]
    fn receiver_and_sender_together_apply() {
        let f = parse("+rs keep.o\n-rs *.o\n-sr *.a\nexclude,rs *.b\n-r *.c\n");
        assert_eq!(f.notes.len(), 1, "{:?}", f.notes);
        assert!(f.notes[0].contains(":5:"), "{:?}", f.notes);
        assert_eq!(check(&f, "d/keep.o", false), Some(I));
        assert_eq!(check(&f, "d/x.o", false), Some(X));
        assert_eq!(check(&f, "d/x.a", false), Some(X));
        assert_eq!(check(&f, "d/x.b", false), Some(X));
        assert_eq!(check(&f, "d/x.c", false), None);
    }

    /// Patterns rsync accepts but that match no path (only `/`, an
    /// unterminated `[`, an unknown `[:class:]`) are accepted, match
    /// nothing (everything with `!`), and are named in a note.
    #[test]
    fn patterns_matching_nothing_are_noted_no_ops() {
        let f = parse("- /\n- //\n- [abc\n- *[[:nope:]]\n+ x\n");
        assert_eq!(f.notes.len(), 4, "{:?}", f.notes);
        assert!(f.notes[0].contains("rsync_filter:1:"), "{}", f.notes[0]);
        assert!(f.notes[2].contains("\"- [abc\""), "{}", f.notes[2]);
        assert!(f.notes[2].contains("unterminated"), "{}", f.notes[2]);
        for (rel, dir) in [("a", false), ("a", true), ("[abc", false), ("b", false)] {
            assert_eq!(check(&f, rel, dir), None, "{rel}");
        }
        assert_eq!(check(&f, "x", false), Some(I));
        let f = parse("-! /\n");
        assert_eq!(check(&f, "a", false), Some(X));
        let f = parse("-! [abc\n");
        assert_eq!(check(&f, "a/b", true), Some(X));
        assert!(f.notes[0].contains("every path"), "{}", f.notes[0]);
        // In a per-directory file: noted too.
        let f = parse(": .f\n");
        let notes = DirRules::default()
            .enter(&f, 0, 1, b"top", b"- [x\n", Path::new("/top/.f"))
            .unwrap();
        assert!(notes[0].contains("/top/.f:1:"), "{notes:?}");
    }

    /// `--exclude-from`'s lines: not trimmed, `\r` ends a line, `#`/`;` at
    /// the start and empty lines skipped.
    #[test]
    fn exclude_file_lines_are_read_as_rsync_reads_them() {
        let got = exclude_file_lines(b"# c\n; c\n\n lead\ntrail \r\na\rb\n #x\n\t\n");
        let want: Vec<(usize, &[u8])> = vec![
            (4, b" lead"),
            (5, b"trail "),
            (6, b"a"),
            (6, b"b"),
            (7, b" #x"),
            (8, b"\t"),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn escaped_names_match_exactly_themselves() {
        for name in ["plain", "back\\slash", "st*r", "a[b]\\c?", "{p,q}"] {
            let r = Rule::exclude(Filter::escape(name).as_bytes()).unwrap();
            assert!(r.matches(name.as_bytes(), 0, true), "{name}");
            assert!(!r.matches(b"other", 0, true), "{name}");
        }
        assert_eq!(Filter::escape("back\\slash"), "back\\slash");
        assert_eq!(Filter::escape("a*\\"), "a\\*\\\\");
    }

    /// (Long: one tree of per-directory files, then one check per rule it shows.)
    #[test]
    fn dir_merge_rules_are_inherited_newest_first_and_anchored_at_their_directory() {
        let f = parse("- /top/early\n: .rsync-filter\ndir-merge,-n .excl\n- *.late\n");
        assert_eq!(f.dir_merges().len(), 2);
        assert!(f.dir_merges_above().iter().all(|m| !m.in_root));
        let g = parse(": /.rsync-filter\n:n .other\n");
        let above: Vec<_> = (g.dir_merges_above().iter())
            .map(|m| (m.merge, m.name, m.in_root, m.no_inherit))
            .collect();
        assert_eq!(
            above,
            vec![
                (0, &b".rsync-filter"[..], true, false),
                (1, &b".other"[..], false, true)
            ]
        );
        let mut d = DirRules::default();
        let file = Path::new("/top/.rsync-filter");
        d.enter(&f, 0, 1, b"top", b"- *.o\n+ keep.late\n- /anch\n", file)
            .unwrap();
        d.enter(&f, 1, 1, b"top", b"only-here\n", Path::new("/top/.excl"))
            .unwrap();
        assert_eq!(f.check(&d, b"top/a.o", false, 1), Some(X));
        assert_eq!(f.check(&d, b"top/keep.late", false, 1), Some(I));
        assert_eq!(f.check(&d, b"top/x.late", false, 1), Some(X));
        assert_eq!(
            f.check(&d, b"top/early", false, 1),
            Some(X),
            "global rule first"
        );
        assert_eq!(f.check(&d, b"top/anch", false, 1), Some(X));
        assert_eq!(
            f.check(&d, b"top/sub/anch", false, 2),
            None,
            "anchored at top/"
        );
        assert_eq!(f.check(&d, b"top/only-here", false, 1), Some(X));
        assert_eq!(
            f.check(&d, b"top/sub/only-here", false, 2),
            None,
            "n: not inherited"
        );
        // A subdirectory's file comes before the inherited rules.
        let sub = Path::new("/top/sub/.rsync-filter");
        d.enter(&f, 0, 2, b"top/sub", b"+ *.o\n", sub).unwrap();
        assert_eq!(f.check(&d, b"top/sub/a.o", false, 2), Some(I));
        assert_eq!(f.check(&d, b"top/sub/b/c.o", false, 3), Some(I));
        d.leave(2);
        assert_eq!(d.len(), 2);
        assert_eq!(f.check(&d, b"top/other/a.o", false, 2), Some(X));
        // `!` in a per-directory file: the inherited rules stop there.
        d.enter(&f, 0, 2, b"top/clr", b"!\n- z\n", sub).unwrap();
        assert_eq!(f.check(&d, b"top/clr/a.o", false, 2), None);
        assert_eq!(f.check(&d, b"top/clr/z", false, 2), Some(X));
        d.leave(1);
        assert!(d.is_empty());
        // Errors name the per-directory file and line; merge is refused there.
        let e = d
            .enter(&f, 0, 1, b"x", b"- a\nmerge /etc/passwd\n", file)
            .unwrap_err();
        assert_eq!((e.file.as_path(), e.line), (file, 2));
        let e = d.enter(&f, 0, 1, b"x", b"+ a\n:x y\n", file).unwrap_err();
        assert_eq!(e.line, 2);
        // Control bytes from a per-directory file are printed escaped.
        let e = d
            .enter(&f, 0, 1, b"x", b"\x1b[31m evil\n", file)
            .unwrap_err();
        assert!(!e.to_string().contains('\x1b'), "{e}");
        assert!(e.to_string().contains("\\x1b"), "{e}");
        // Size caps: one file, and all held along the path.
        let big = vec![b'#'; MAX_DIR_FILE + 1];
        let e = d.enter(&f, 0, 1, b"x", &big, file).unwrap_err();
        assert!(e.to_string().contains("larger"), "{e}");
        let chunk = vec![b'#'; MAX_DIR_FILE];
        let mut depth = 1;
        let e = loop {
            match d.enter(&f, 0, depth, b"x", &chunk, file) {
                Ok(_) => depth += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(depth - 1, MAX_DIR_RULES_HELD / MAX_DIR_FILE);
        assert!(e.to_string().contains("along this path"), "{e}");
        d.leave(1);
        d.enter(&f, 0, 1, b"x", &chunk, file).unwrap();
        d.leave(1);
        // The rules count, not only their text: a file of 4-byte rules
        // holds about 40 times its size.
        let tiny = b"- a\n".repeat(MAX_DIR_FILE / 4);
        let e = d.enter(&f, 0, 1, b"x", &tiny, file).unwrap_err();
        assert!(e.to_string().contains("bytes of rules"), "{e}");
        assert!(d.is_empty());
        // `e`: the per-directory file itself is left out.
        let f = parse(":e .rsync-filter\n");
        assert_eq!(
            f.check(&DirRules::default(), b"a/.rsync-filter", false, 1),
            Some(X)
        );
    }
}
