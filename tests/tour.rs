//! The README's tour, run as written: every command block of "A five-minute tour" runs
//! in order against the real binary, in the terminals the tour names, and every output
//! block must match what the commands print, but for the values the block marks as
//! varying. The README and what a newcomer sees cannot drift apart.
//!
//! The markup is an HTML comment right before each fenced block (GitHub does not show
//! it):
//!
//! - `<!-- tour: setup -->` before the `sh` block that builds the binary and puts it on
//!   `PATH`. The build line is checked, not run: cargo built the binary for this test.
//!   The test runs the block's `export` lines at the start of every terminal, in a
//!   directory whose `target/release/strata` is that binary.
//! - `<!-- tour: run -->` before an `sh` block run to completion in the tour's own
//!   terminal; it must succeed.
//! - `<!-- tour: start NAME -->` before an `sh` block of one long-running command,
//!   started in terminal NAME and left running.
//! - `<!-- tour: output -->` before a `text` block: what the `run` block before it
//!   printed, standard output and standard error together as a terminal shows them. A
//!   `run` block that prints anything must be followed by one.
//! - `<!-- tour: output NAME -->`: the next lines terminal NAME prints (the test waits
//!   for them).
//! - `<!-- tour: ctrl-c NAME -->`, on a line of its own: Ctrl-C (SIGINT) in terminal
//!   NAME; it must exit, and an `output NAME` block may show its last lines. Every
//!   terminal is stopped this way by the end, with nothing it printed left unshown.
//!
//! After the kind, comma-separated options: `interleaved` (lines whose first
//! tab-separated field differs may come in any order, as `strata consume` prints
//! partitions read concurrently; lines with the same first field keep their order),
//! `last` (only the last lines of what the terminal printed, for the broker's log), and
//! `varies: KIND and KIND` with the kinds `timestamps` (13-digit milliseconds),
//! `member ids` (16 hex digits; every id must stand where the README's does, the same
//! id in the same places throughout), `port` (of `127.0.0.1:...`) and `log times`.
//!
//! The broker runs with `STRATA_LISTEN=127.0.0.1:0`, so on a free port, and the other
//! terminals get its address in `STRATA_BROKER`; both are documented settings, so the
//! commands run exactly as the README writes them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::common::STRATA;

/// How long a command may take to finish or to print what the README shows. Never
/// reached when things work.
const DEADLINE: Duration = Duration::from_secs(60);
/// Pause between checks of whether a process exited.
const POLL_PAUSE: Duration = Duration::from_millis(20);
/// What the build line of the setup block must say: the binary the tour uses.
const BUILD: &str = "cargo build --release -p strata-broker";

/// One marked block (or Ctrl-C) of the tour, in README order.
#[derive(Debug)]
struct Step {
    /// The README line of the marker, for messages.
    line: usize,
    kind: Kind,
    /// The block's lines.
    body: Vec<String>,
    options: Options,
}

#[derive(Debug, PartialEq)]
enum Kind {
    Setup,
    Run,
    Start(String),
    /// Output of the last `run` block (`None`) or of a terminal.
    Output(Option<String>),
    CtrlC(String),
}

#[derive(Debug, Default, Clone)]
struct Options {
    interleaved: bool,
    last: bool,
    varies: Vec<Varying>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Varying {
    Timestamps,
    MemberIds,
    Port,
    LogTimes,
}

/// Reads the tour section of the README into steps; panics on a fenced block without a
/// marker or a marker it does not know.
fn parse(readme: &str) -> Vec<Step> {
    let mut lines = readme.lines().enumerate().map(|(i, l)| (i + 1, l));
    lines
        .by_ref()
        .find(|(_, l)| *l == "## A five-minute tour")
        .expect("the README has a section \"## A five-minute tour\"");
    let mut steps = Vec::new();
    let mut pending: Option<(usize, Kind, Options)> = None;
    while let Some((n, line)) = lines.next() {
        if line.starts_with("## ") {
            break;
        }
        if let Some(marker) = line
            .trim()
            .strip_prefix("<!-- tour:")
            .and_then(|m| m.strip_suffix("-->"))
        {
            assert!(
                pending.is_none(),
                "README:{n}: two markers without a block between"
            );
            let (kind, options) = marker_of(n, marker.trim());
            if let Kind::CtrlC(_) = kind {
                steps.push(Step {
                    line: n,
                    kind,
                    body: Vec::new(),
                    options,
                });
            } else {
                pending = Some((n, kind, options));
            }
            continue;
        }
        if let Some(lang) = line.strip_prefix("```") {
            let (at, kind, options) = pending.take().unwrap_or_else(|| {
                panic!("README:{n}: a ```{lang} block of the tour without a tour marker")
            });
            let expected_lang = if matches!(kind, Kind::Output(_)) {
                "text"
            } else {
                "sh"
            };
            assert_eq!(
                lang, expected_lang,
                "README:{n}: the block of the marker on line {at}"
            );
            let body = lines
                .by_ref()
                .map(|(_, l)| l)
                .take_while(|l| *l != "```")
                .map(str::to_string)
                .collect();
            steps.push(Step {
                line: at,
                kind,
                body,
                options,
            });
        }
    }
    assert!(
        pending.is_none(),
        "the tour ends with a marker without its block"
    );
    steps
}

fn marker_of(n: usize, marker: &str) -> (Kind, Options) {
    let mut parts = marker.split(',').map(str::trim);
    let mut head = parts.next().unwrap_or_default().split_whitespace();
    let kind = head.next().unwrap_or_default();
    let name = head.next().map(str::to_string);
    let kind = match (kind, name) {
        ("setup", None) => Kind::Setup,
        ("run", None) => Kind::Run,
        ("start", Some(name)) => Kind::Start(name),
        ("output", name) => Kind::Output(name),
        ("ctrl-c", Some(name)) => Kind::CtrlC(name),
        other => panic!("README:{n}: unknown tour marker {other:?}"),
    };
    let mut options = Options::default();
    for option in parts {
        match option {
            "interleaved" => options.interleaved = true,
            "last" => options.last = true,
            _ => {
                let kinds = option
                    .strip_prefix("varies:")
                    .unwrap_or_else(|| panic!("README:{n}: unknown option {option:?}"));
                for kind in kinds.split(" and ").map(str::trim) {
                    options.varies.push(match kind {
                        "timestamps" => Varying::Timestamps,
                        "member ids" => Varying::MemberIds,
                        "port" => Varying::Port,
                        "log times" => Varying::LogTimes,
                        other => panic!("README:{n}: unknown varying kind {other:?}"),
                    });
                }
            }
        }
    }
    (kind, options)
}

/// Lines a process printed, filled by a reader thread.
#[derive(Default)]
struct Printed {
    lines: Vec<String>,
    closed: bool,
}

/// A process of the tour: a shell running a block, its standard output and error
/// merged into one pipe as a terminal shows them.
struct Terminal {
    name: String,
    child: Child,
    printed: Arc<(Mutex<Printed>, Condvar)>,
    /// Lines already compared with the README.
    shown: usize,
}

impl Terminal {
    fn spawn(name: &str, dir: &Path, script: &str, env: &[(&str, String)]) -> Terminal {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("clone the pipe"))
            .stderr(writer);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STRATA_") {
                command.env_remove(key);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        // The command holds the pipe's write ends; dropping it leaves them to the child,
        // so the reader sees the end when the child exits.
        drop(command);
        let printed = Arc::new((Mutex::new(Printed::default()), Condvar::new()));
        let sink = Arc::clone(&printed);
        std::thread::spawn(move || {
            let (lock, changed) = &*sink;
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                lock.lock().expect("not poisoned").lines.push(line);
                changed.notify_all();
            }
            lock.lock().expect("not poisoned").closed = true;
            changed.notify_all();
        });
        Terminal {
            name: name.to_string(),
            child,
            printed,
            shown: 0,
        }
    }

    /// Waits until `ready` holds for what it printed (or it closed its output), and
    /// returns the lines.
    fn wait_for(&self, what: &str, ready: impl Fn(&[String]) -> bool) -> Vec<String> {
        let (lock, changed) = &*self.printed;
        let deadline = Instant::now() + DEADLINE;
        let mut printed = lock.lock().expect("not poisoned");
        while !ready(&printed.lines) && !printed.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: waited {DEADLINE:?} for {what}; it printed:\n{}",
                self.name,
                printed.lines.join("\n")
            );
            printed = changed.wait_timeout(printed, left).expect("not poisoned").0;
        }
        printed.lines.clone()
    }

    /// The next `count` lines it prints.
    fn next_lines(&mut self, count: usize) -> Vec<String> {
        let from = self.shown;
        let lines = self.wait_for(&format!("{count} more lines"), |l| l.len() >= from + count);
        let end = lines.len().min(from + count);
        self.shown = end;
        lines[from..end].to_vec()
    }

    /// Waits for the process to exit; returns its status and every line not shown yet.
    fn wait_exit(&mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the process") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: did not exit within {DEADLINE:?}",
                self.name
            );
            std::thread::sleep(POLL_PAUSE);
        };
        let lines = self.wait_for("the end of its output", |_| false);
        let rest = lines[self.shown..].to_vec();
        self.shown = lines.len();
        (status, rest)
    }

    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT {}: {status}", self.name);
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces what varies by placeholders; member ids are numbered in order of first
/// appearance in `ids`, shared by the whole tour, so the same id must appear in the same
/// places on both sides.
fn normalize(line: &str, varies: &[Varying], ids: &mut Vec<String>) -> String {
    let words: Vec<&str> = line
        .split(' ')
        .map(|word| {
            if varies.contains(&Varying::LogTimes) && is_log_time(word) {
                "<time>"
            } else {
                word
            }
        })
        .collect();
    let mut line = words.join(" ");
    if varies.contains(&Varying::Port) {
        const HOST: &str = "127.0.0.1:";
        let mut rest = line.as_str();
        let mut out = String::new();
        while let Some(at) = rest.find(HOST) {
            let after = &rest[at + HOST.len()..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            out.push_str(&rest[..at + HOST.len()]);
            out.push_str("<port>");
            rest = &after[digits..];
        }
        out.push_str(rest);
        line = out;
    }
    // Ids and timestamps are whole alphanumeric runs (tabs and spaces delimit them).
    let mut out = String::with_capacity(line.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String, ids: &mut Vec<String>| {
        let hex = run.len() == 16
            && run
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if varies.contains(&Varying::MemberIds) && hex {
            let n = ids.iter().position(|id| id == run).unwrap_or_else(|| {
                ids.push(run.clone());
                ids.len() - 1
            });
            out.push_str(&format!("<member {}>", n + 1));
        } else if varies.contains(&Varying::Timestamps)
            && run.len() == 13
            && run.bytes().all(|b| b.is_ascii_digit())
        {
            out.push_str("<timestamp>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in line.chars() {
        if c.is_ascii_alphanumeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out, ids);
            out.push(c);
        }
    }
    flush(&mut run, &mut out, ids);
    out.trim_end().to_string()
}

/// `2026-01-01T09:00:00.123456Z`, as the broker's log starts its lines.
fn is_log_time(word: &str) -> bool {
    let b = word.as_bytes();
    b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[10] == b'T'
        && word.ends_with('Z')
        && b.iter().all(|c| c.is_ascii_digit() || b"-:.TZ".contains(c))
}

/// Lines as they are compared: normalized, and for `interleaved` grouped by their
/// first tab-separated field (each group in order).
fn comparable(lines: &[String], options: &Options, ids: &mut Vec<String>) -> Vec<String> {
    if !options.interleaved {
        return lines
            .iter()
            .map(|l| normalize(l, &options.varies, ids))
            .collect();
    }
    let mut groups: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for line in lines {
        let first = if line.contains('\t') {
            line.split('\t').next().unwrap_or_default()
        } else {
            ""
        };
        groups.entry(first).or_default().push(line);
    }
    groups
        .into_values()
        .flatten()
        .map(|l| normalize(l, &options.varies, ids))
        .collect()
}

/// Output a block printed that the README has yet to show: the block's README line,
/// the terminal (`None` for a `run` block) and the lines.
type Unshown = (usize, Option<String>, Vec<String>);

struct Tour {
    dir: tempfile::TempDir,
    prelude: String,
    env: Vec<(&'static str, String)>,
    terminals: BTreeMap<String, Terminal>,
    /// What the last `run` block printed, or a stopped terminal's last lines, until an
    /// `output` block shows it.
    unshown: Option<Unshown>,
    /// Member ids of the README and of the run, in order of first appearance.
    ids: (Vec<String>, Vec<String>),
}

impl Tour {
    fn compare(&mut self, step: &Step, actual: &[String], what: &str) {
        let want = comparable(&step.body, &step.options, &mut self.ids.0);
        let got = comparable(actual, &step.options, &mut self.ids.1);
        assert!(
            want == got,
            "README:{}: {what} differs from the README.\n--- README (normalized) ---\n{}\n\
             --- printed (normalized) ---\n{}\n--- printed ---\n{}",
            step.line,
            want.join("\n"),
            got.join("\n"),
            actual.join("\n")
        );
    }

    fn script(&self, body: &[String]) -> String {
        format!("set -e\n{}\n{}\n", self.prelude, body.join("\n"))
    }

    fn step(&mut self, step: &Step) {
        let unshown = self.unshown.take();
        if let Some((line, terminal, printed)) = &unshown {
            let shown_now = matches!(&step.kind, Kind::Output(name) if name == terminal);
            assert!(
                shown_now,
                "README:{line}: {} printed what the README does not show:\n{}",
                terminal.as_deref().unwrap_or("the block"),
                printed.join("\n")
            );
        }
        match &step.kind {
            Kind::Setup => {
                assert_eq!(
                    step.body.first().map(String::as_str),
                    Some(BUILD),
                    "README:{}: the setup builds the binary",
                    step.line
                );
                let exports = &step.body[1..];
                assert!(
                    !exports.is_empty() && exports.iter().all(|l| l.starts_with("export ")),
                    "README:{}: after the build, the setup only exports variables",
                    step.line
                );
                self.prelude = exports.join("\n");
            }
            Kind::Run => {
                assert!(
                    !self.prelude.is_empty(),
                    "README:{}: run before setup",
                    step.line
                );
                let mut terminal = Terminal::spawn(
                    &format!("the block of README:{}", step.line),
                    self.dir.path(),
                    &self.script(&step.body),
                    &self.env,
                );
                let (status, printed) = terminal.wait_exit();
                assert!(
                    status.success(),
                    "README:{}: the block failed ({status}):\n{}",
                    step.line,
                    printed.join("\n")
                );
                if !printed.is_empty() {
                    self.unshown = Some((step.line, None, printed));
                }
            }
            Kind::Start(name) => {
                assert!(
                    step.body.len() == 1,
                    "README:{}: a started block holds one command",
                    step.line
                );
                let command = &step.body[0];
                let mut env = self.env.clone();
                let serve = command == "strata serve";
                if serve {
                    env.push(("STRATA_LISTEN", "127.0.0.1:0".to_string()));
                }
                // exec: the signals the test sends reach the command, not the shell.
                let script = self.script(&[format!("exec {command}")]);
                let terminal = Terminal::spawn(name, self.dir.path(), &script, &env);
                if serve {
                    let lines = terminal.wait_for("strata listening on", |lines| {
                        lines.iter().any(|l| l.starts_with("strata listening on "))
                    });
                    let address = lines
                        .iter()
                        .find_map(|l| l.strip_prefix("strata listening on "))
                        .unwrap_or_else(|| {
                            panic!("the broker did not start:\n{}", lines.join("\n"))
                        })
                        .to_string();
                    self.env.push(("STRATA_BROKER", address));
                }
                assert!(
                    self.terminals.insert(name.clone(), terminal).is_none(),
                    "README:{}: terminal {name} is already running",
                    step.line
                );
            }
            Kind::Output(name) => {
                let (printed, what) = match (unshown, name) {
                    (Some((line, terminal, mut printed)), _) => {
                        if step.options.last {
                            printed.drain(..printed.len().saturating_sub(step.body.len()));
                        }
                        let what = match terminal {
                            Some(name) => format!("what {name} printed last"),
                            None => format!("the output of README:{line}"),
                        };
                        (printed, what)
                    }
                    (None, Some(name)) => {
                        assert!(
                            !step.options.last,
                            "README:{}: `last` is for a stopped terminal",
                            step.line
                        );
                        let terminal = self.terminals.get_mut(name).unwrap_or_else(|| {
                            panic!("README:{}: no terminal {name} is running", step.line)
                        });
                        (
                            terminal.next_lines(step.body.len()),
                            format!("what {name} printed"),
                        )
                    }
                    (None, None) => {
                        panic!(
                            "README:{}: output of a block that printed nothing",
                            step.line
                        )
                    }
                };
                self.compare(step, &printed, &what);
            }
            Kind::CtrlC(name) => {
                let mut terminal = self
                    .terminals
                    .remove(name)
                    .unwrap_or_else(|| panic!("README:{}: no terminal {name}", step.line));
                terminal.interrupt();
                let (status, rest) = terminal.wait_exit();
                // Ctrl-C ends a command that does not handle it with SIGINT.
                assert!(
                    status.success() || status.signal() == Some(SIGINT),
                    "README:{}: {name} ended with {status} after Ctrl-C:\n{}",
                    step.line,
                    rest.join("\n")
                );
                if !rest.is_empty() {
                    self.unshown = Some((step.line, Some(name.clone()), rest));
                }
            }
        }
    }
}

const SIGINT: i32 = 2;

/// Runs the README's tour and compares every output it shows; see the module docs.
#[test]
fn the_readme_tour_prints_what_the_readme_shows() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("read README.md");
    let steps = parse(&readme);
    assert!(
        steps.first().is_some_and(|s| s.kind == Kind::Setup),
        "the tour starts with its setup block"
    );
    let dir = tempfile::Builder::new()
        .prefix("strata-tour-")
        .tempdir()
        .expect("a temporary directory");
    let release = dir.path().join("target").join("release");
    std::fs::create_dir_all(&release).expect("create target/release");
    std::os::unix::fs::symlink(STRATA, release.join("strata")).expect("link the binary");
    let mut tour = Tour {
        dir,
        prelude: String::new(),
        env: Vec::new(),
        terminals: BTreeMap::new(),
        unshown: None,
        ids: (Vec::new(), Vec::new()),
    };
    for step in &steps {
        tour.step(step);
    }
    if let Some((line, terminal, printed)) = tour.unshown.take() {
        panic!(
            "README:{line}: {} printed what the README does not show:\n{}",
            terminal.as_deref().unwrap_or("the block"),
            printed.join("\n")
        );
    }
    let running: Vec<&String> = tour.terminals.keys().collect();
    assert!(running.is_empty(), "the tour leaves {running:?} running");
}
