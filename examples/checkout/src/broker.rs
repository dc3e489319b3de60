//! Finding the `strata` binary and running a broker as a child process, for `checkout
//! demo`, `checkout load` and the tests.
//!
//! The checkout does not link the broker (nothing but its own binary depends on
//! `strata-broker`), so it runs the `strata` binary, found in this order:
//! 1. the path given with `--strata-bin`;
//! 2. `strata` next to this executable (cargo puts both in `target/<profile>/`; test
//!    executables live one level down, in `deps/`). When cargo started this process
//!    (`cargo run`, `cargo test`: `CARGO` is set) and the broker's sources in this
//!    workspace are newer than that binary, or it is missing, it is built first with
//!    `cargo build -p strata-broker --bin strata` in the same profile, so a test never
//!    runs a stale broker;
//! 3. `strata` on `PATH`.
//!
//! The broker runs `strata serve --listen 127.0.0.1:0` over a data directory and
//! prints `strata listening on <addr>`, which is read to learn its port.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::{Error, Result};

/// The broker's sources, relative to the workspace root: when any is newer than the
/// binary, cargo rebuilds it.
const BROKER_SOURCES: [&str; 4] = ["broker", "storage", "proto", "Cargo.lock"];

/// The `strata` binary to run (see the module notes).
pub fn find_strata(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(Error::Setup(format!(
                "--strata-bin {} is not a file",
                path.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(Error::io("find this executable"))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| Error::Setup("this executable has no parent directory".into()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let beside = dir.join(format!("strata{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_if_stale(Path::new(&cargo), dir, &beside)?;
    }
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(on_path) = search_path("strata") {
        return Ok(on_path);
    }
    Err(Error::Setup(format!(
        "no strata binary at {} nor on PATH: build it with `cargo build --release -p \
         strata-broker --bin strata`, pass --strata-bin, or give a running broker with --broker",
        beside.display()
    )))
}

/// Runs `cargo build -p strata-broker --bin strata` when `binary` is missing or older
/// than the broker's sources in the workspace this crate was built from. Once per
/// process: tests running in parallel build it once.
fn build_if_stale(cargo: &Path, profile_dir: &Path, binary: &Path) -> Result<()> {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if *checked {
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !root.join("broker/Cargo.toml").is_file() {
        // Not run from this workspace's sources: use what is there.
        *checked = true;
        return Ok(());
    }
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok();
    let stale = match built {
        None => true,
        Some(built) => BROKER_SOURCES
            .iter()
            .any(|source| newer_than(&root.join(source), built)),
    };
    if stale {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        eprintln!(
            "checkout: bringing the strata broker up to date ({} profile)",
            if release { "release" } else { "dev" }
        );
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "strata-broker", "--bin", "strata"])
            .current_dir(&root);
        if release {
            build.arg("--release");
        }
        let status = build
            .status()
            .map_err(Error::io("run cargo build for the broker"))?;
        if !status.success() || !binary.is_file() {
            return Err(Error::Setup(format!(
                "cargo build -p strata-broker --bin strata failed ({status}) or did not \
                 produce {}",
                binary.display()
            )));
        }
    }
    *checked = true;
    Ok(())
}

/// Whether `path`, or any file below it, was modified after `time`.
fn newer_than(path: &Path, time: SystemTime) -> bool {
    let Ok(metadata) = std::fs::metadata(path) else {
        return false;
    };
    if metadata.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return false;
        };
        entries
            .flatten()
            .any(|entry| newer_than(&entry.path(), time))
    } else {
        metadata.modified().is_ok_and(|m| m > time)
    }
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX)))
        .find(|candidate| candidate.is_file())
}

/// A `strata serve` child process. Dropping it kills the broker (SIGKILL) and, if it
/// made the data directory, removes it.
#[derive(Debug)]
pub struct SpawnedBroker {
    child: Child,
    address: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The temporary directory holding the data and log, when none was given.
    _temp: Option<tempfile::TempDir>,
}

impl SpawnedBroker {
    /// Starts `binary serve` on a free loopback port, over `data_dir` (a new temporary
    /// directory if `None`), and waits until it listens. Blocks: call it from
    /// `spawn_blocking` inside a runtime.
    pub fn start(binary: &Path, data_dir: Option<&Path>) -> Result<SpawnedBroker> {
        let (temp, base) = match data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(Error::io(format!("create {}", dir.display())))?;
                (None, dir.to_path_buf())
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("checkout-strata-")
                    .tempdir()
                    .map_err(Error::io("create a temporary data directory"))?;
                let base = temp.path().to_path_buf();
                (Some(temp), base)
            }
        };
        let data_dir = base.join("data");
        let log_path = base.join("broker.log");
        let log = std::fs::File::create(&log_path)
            .map_err(Error::io(format!("create {}", log_path.display())))?;
        let mut command = Command::new(binary);
        // An operator's STRATA_* settings must not change the broker started here.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("STRATA_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(Error::io(format!("run {}", binary.display())))?;
        let stdout = child.stdout.take();
        let mut broker = SpawnedBroker {
            child,
            address: String::new(),
            data_dir,
            log_path,
            _temp: temp,
        };
        let stdout =
            stdout.ok_or_else(|| Error::Setup("the broker's stdout is not piped".into()))?;
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            let read = lines
                .read_line(&mut line)
                .map_err(Error::io("read the broker's output"))?;
            if read == 0 {
                return Err(Error::Setup(format!(
                    "{} exited before listening; its log:\n{}",
                    binary.display(),
                    broker.log()
                )));
            }
            if let Some(address) = line.trim().strip_prefix("strata listening on ") {
                broker.address = address.to_string();
                break;
            }
        }
        // Keep draining stdout so the broker never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        Ok(broker)
    }

    /// `host:port` it listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
