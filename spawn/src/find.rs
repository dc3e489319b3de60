//! Finding the `strata` binary, and building it first when cargo runs us and it is
//! stale (see the crate notes for the order).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::{Error, Result};

/// The broker's sources, relative to the workspace root: when any is newer than the
/// binary, cargo rebuilds it.
const BROKER_SOURCES: [&str; 4] = ["broker", "storage", "proto", "Cargo.lock"];

/// The `strata` binary to run: `explicit` (the caller's `--strata-bin`), else the one
/// next to this executable (built first if stale, when cargo started this process),
/// else the one on `PATH`.
///
/// `progress` names the calling tool in the line printed to stderr before a build
/// (`strata-bench: bringing the strata broker up to date (release profile)`); `None`
/// prints nothing.
pub fn find_strata(explicit: Option<&Path>, progress: Option<&str>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(Error::NotAFile(path.to_path_buf()))
        };
    }
    let exe = std::env::current_exe().map_err(Error::io("find this executable"))?;
    let dir = profile_dir(&exe).ok_or_else(|| Error::Io {
        context: format!("find the directory of {}", exe.display()),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let beside = dir.join(format!("strata{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_if_stale(Path::new(&cargo), dir, &beside, progress)?;
    }
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(on_path) = search_path("strata") {
        return Ok(on_path);
    }
    Err(Error::NotFound { beside })
}

/// The directory cargo put `exe` in (`target/<profile>/`): its parent, or its
/// grandparent for a test executable in `deps/`.
fn profile_dir(exe: &Path) -> Option<&Path> {
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        return Some(dir.parent().unwrap_or(dir));
    }
    Some(dir)
}

/// Runs `cargo build -p strata-broker --bin strata` when `binary` is missing or older
/// than the broker's sources in the workspace this crate was built from. Once per
/// process: callers running in parallel (tests) build it once.
fn build_if_stale(
    cargo: &Path,
    profile_dir: &Path,
    binary: &Path,
    progress: Option<&str>,
) -> Result<()> {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if *checked {
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
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
        // The same profile as this executable, so the broker lands next to it.
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        if let Some(tool) = progress {
            eprintln!(
                "{tool}: bringing the strata broker up to date ({} profile)",
                if release { "release" } else { "dev" }
            );
        }
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
            return Err(Error::Build {
                status,
                binary: binary.to_path_buf(),
            });
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

/// `name` (with the platform's executable suffix) in the first `PATH` directory that
/// has it.
fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX)))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_named_binary_that_is_missing_is_an_error_naming_the_flag() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let missing = dir.path().join("strata");
        let error = find_strata(Some(&missing), None).expect_err("no such file");
        assert!(matches!(&error, Error::NotAFile(path) if *path == missing));
        assert!(error.to_string().starts_with("--strata-bin "), "{error}");
    }

    #[test]
    fn a_named_binary_that_exists_is_used_as_it_is() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let named = dir.path().join("my-strata");
        File::create(&named).expect("create the binary");
        assert_eq!(find_strata(Some(&named), None).expect("found"), named);
    }

    #[test]
    fn test_executables_look_in_the_profile_directory_above_deps() {
        let check = |exe: &str, expected: &str| {
            assert_eq!(
                profile_dir(Path::new(exe)),
                Some(Path::new(expected)),
                "{exe}"
            );
        };
        check("/w/target/release/strata-bench", "/w/target/release");
        check("/w/target/debug/deps/flow-0123abcd", "/w/target/debug");
        check("/usr/local/bin/checkout", "/usr/local/bin");
    }

    #[test]
    fn a_tree_is_newer_when_any_file_below_it_is() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let nested = dir.path().join("src/topics");
        std::fs::create_dir_all(&nested).expect("create the tree");
        let base = SystemTime::now() - Duration::from_secs(3600);
        let old = File::create(dir.path().join("Cargo.toml")).expect("create a file");
        old.set_modified(base - Duration::from_secs(60))
            .expect("set the time");
        let deep = File::create(nested.join("partition.rs")).expect("create a file");
        deep.set_modified(base - Duration::from_secs(60))
            .expect("set the time");
        assert!(!newer_than(dir.path(), base));

        deep.set_modified(base + Duration::from_secs(60))
            .expect("set the time");
        assert!(newer_than(dir.path(), base));
        assert!(!newer_than(&dir.path().join("Cargo.toml"), base));
        assert!(!newer_than(&dir.path().join("missing"), base));
    }
}
