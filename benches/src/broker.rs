//! Starting a `strata` broker as a child process for a run.
//!
//! The bench does not link the broker (nothing depends on `strata-broker`); it runs the
//! `strata` binary: `--strata-bin`, else the one next to this executable in cargo's
//! target directory, which `cargo run` (it sets `CARGO`) first brings up to date with
//! `cargo build`. The broker listens on 127.0.0.1:0 over a temporary data
//! directory and prints `strata listening on <addr>`; the bench reads that line.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// A broker this run started. Dropping it kills the process and removes its data.
#[derive(Debug)]
pub struct SpawnedBroker {
    child: Child,
    address: String,
    binary: PathBuf,
    /// The data directory and the broker's log; removed on drop, after the kill.
    dir: tempfile::TempDir,
}

impl SpawnedBroker {
    /// Starts `strata serve` over a fresh directory inside `parent`.
    pub fn start(binary: &Path, parent: &Path) -> Result<SpawnedBroker> {
        let dir = tempfile::Builder::new()
            .prefix("strata-bench-")
            .tempdir_in(parent)
            .map_err(Error::io(format!(
                "create a data directory in {}",
                parent.display()
            )))?;
        let data = dir.path().join("data");
        let log_path = dir.path().join("broker.log");
        let log = std::fs::File::create(&log_path).map_err(Error::io("create the broker log"))?;
        let mut command = Command::new(binary);
        // An operator's STRATA_* settings must not change the broker under test.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("STRATA_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(Error::io(format!("run {}", binary.display())))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            return Err(Error::Broker("the broker's stdout is not piped".into()));
        };
        let mut broker = SpawnedBroker {
            child,
            address: String::new(),
            binary: binary.to_path_buf(),
            dir,
        };
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            let read = lines
                .read_line(&mut line)
                .map_err(Error::io("read the broker's output"))?;
            if read == 0 {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(Error::Broker(format!(
                    "{} exited before listening; its log:\n{log}",
                    binary.display()
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

    /// `host:port` the broker listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The binary that runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `strata` binary to run: `explicit`, else the one next to this executable, built
/// (or brought up to date) with cargo first when this process was started by cargo.
pub fn find_strata(explicit: Option<&Path>, quiet: bool) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(Error::Broker(format!(
                "--strata-bin {} is not a file",
                path.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(Error::io("find this executable"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Broker("this executable has no parent directory".into()))?;
    let beside = dir.join(format!("strata{}", std::env::consts::EXE_SUFFIX));
    // Under `cargo run` the broker is always (re)built: cargo does nothing when it is
    // fresh, and a stale binary from an older checkout would run an older protocol.
    let Some(cargo) = std::env::var_os("CARGO") else {
        if beside.is_file() {
            return Ok(beside);
        }
        return Err(Error::Broker(format!(
            "no strata binary at {}: build it with `cargo build --release -p strata-broker \
             --bin strata`, pass --strata-bin, or give a running broker with --broker",
            beside.display()
        )));
    };
    // Build the broker with the same profile as this executable, so it lands beside it.
    let release = dir.file_name().is_some_and(|n| n == "release");
    if !quiet {
        eprintln!(
            "strata-bench: building the broker if needed ({} profile)",
            if release { "release" } else { "dev" }
        );
    }
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "strata-broker", "--bin", "strata"]);
    if release {
        build.arg("--release");
    }
    if let Some(manifest_dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        build.current_dir(manifest_dir);
    }
    let status = build
        .status()
        .map_err(Error::io("run cargo build for the broker"))?;
    if !status.success() || !beside.is_file() {
        return Err(Error::Broker(format!(
            "cargo build -p strata-broker --bin strata failed ({status}) or did not produce {}",
            beside.display()
        )));
    }
    Ok(beside)
}
