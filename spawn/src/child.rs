//! A `strata serve` child process on a free loopback port.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// Where a spawned broker keeps its data (`data/`) and its stderr (`broker.log`).
#[derive(Debug, Clone, Copy)]
pub enum BrokerDir<'a> {
    /// A new temporary directory inside this one (the system's temporary directory
    /// when `None`), removed when the broker is dropped.
    Temporary(Option<&'a Path>),
    /// This directory, created if missing and kept after the broker stops.
    Kept(&'a Path),
}

/// A `strata serve` child process. Dropping it kills the broker (SIGKILL) and, if it
/// made a temporary directory, removes it.
#[derive(Debug)]
pub struct SpawnedBroker {
    child: Child,
    address: String,
    binary: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The temporary directory holding the data and the log, if one was made; removed
    /// after `Drop` has killed the child.
    _temp: Option<tempfile::TempDir>,
}

impl SpawnedBroker {
    /// Starts `binary serve` on a free loopback port over `dir`, and waits until it
    /// listens. Blocks: call it from `spawn_blocking` inside a runtime.
    pub fn start(binary: &Path, dir: BrokerDir<'_>) -> Result<SpawnedBroker> {
        let (temp, base) = match dir {
            BrokerDir::Kept(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(Error::io(format!("create {}", dir.display())))?;
                (None, dir.to_path_buf())
            }
            BrokerDir::Temporary(parent) => {
                let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
                let temp = tempfile::Builder::new()
                    .prefix("strata-broker-")
                    .tempdir_in(&parent)
                    .map_err(Error::io(format!(
                        "create a data directory in {}",
                        parent.display()
                    )))?;
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
            binary: binary.to_path_buf(),
            data_dir,
            log_path,
            _temp: temp,
        };
        let stdout = stdout.ok_or_else(|| Error::Io {
            context: "read the broker's output".into(),
            source: std::io::Error::other("its stdout is not piped"),
        })?;
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            let read = lines
                .read_line(&mut line)
                .map_err(Error::io("read the broker's output"))?;
            if read == 0 {
                return Err(Error::Exited {
                    binary: binary.to_path_buf(),
                    log: broker.log(),
                });
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

    /// Its process id, to read its resources from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The binary that runs.
    pub fn binary(&self) -> &Path {
        &self.binary
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

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::OnceLock;

    use super::*;

    /// Stand-ins for `strata`, written once before any test spawns one: a file being
    /// written while another thread forks can not be executed ("text file busy").
    struct Fakes {
        _dir: tempfile::TempDir,
        /// Logs its arguments, prints the line `strata serve` prints, and waits.
        listening: PathBuf,
        /// Logs a complaint and exits without listening.
        failing: PathBuf,
    }

    fn fakes() -> &'static Fakes {
        static FAKES: OnceLock<Fakes> = OnceLock::new();
        FAKES.get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let write = |name: &str, script: &str| {
                let path = dir.path().join(name);
                std::fs::write(&path, script).expect("write the script");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .expect("make the script executable");
                path
            };
            Fakes {
                listening: write(
                    "listening",
                    concat!(
                        "#!/bin/sh\n",
                        "echo \"$@\" >&2\n",
                        "echo 'strata listening on 127.0.0.1:7717'\n",
                        "exec sleep 600\n",
                    ),
                ),
                failing: write(
                    "failing",
                    concat!(
                        "#!/bin/sh\n",
                        "echo 'cannot open the data directory' >&2\n",
                        "exit 2\n",
                    ),
                ),
                _dir: dir,
            }
        })
    }

    #[test]
    fn a_temporary_directory_holds_data_and_log_until_the_broker_drops() {
        let parent = tempfile::tempdir().expect("a temporary directory");
        let broker = SpawnedBroker::start(
            &fakes().listening,
            BrokerDir::Temporary(Some(parent.path())),
        )
        .expect("the fake broker starts");
        assert_eq!(broker.address(), "127.0.0.1:7717");
        assert_eq!(broker.binary(), fakes().listening);
        let data = broker.data_dir().to_path_buf();
        assert!(data.starts_with(parent.path()));
        assert_eq!(
            broker.log().trim(),
            format!("serve --listen 127.0.0.1:0 --data-dir {}", data.display())
        );
        let base = data
            .parent()
            .expect("data is inside the base")
            .to_path_buf();
        drop(broker);
        assert!(!base.exists());
    }

    #[test]
    fn a_kept_directory_is_made_and_stays() {
        let parent = tempfile::tempdir().expect("a temporary directory");
        let kept = parent.path().join("demo/broker");
        let broker = SpawnedBroker::start(&fakes().listening, BrokerDir::Kept(&kept))
            .expect("the fake broker starts");
        assert_eq!(broker.data_dir(), kept.join("data"));
        drop(broker);
        assert!(kept.join("broker.log").is_file());
    }

    #[test]
    fn a_broker_that_exits_before_listening_is_an_error_with_its_log() {
        let error = SpawnedBroker::start(&fakes().failing, BrokerDir::Temporary(None))
            .expect_err("the fake broker exits");
        let Error::Exited { binary, log } = &error else {
            panic!("not Exited: {error}");
        };
        assert_eq!(*binary, fakes().failing);
        assert_eq!(log.trim(), "cannot open the data directory");
        assert!(
            error.to_string().contains("exited before listening"),
            "{error}"
        );
    }
}
