//! Helpers shared by the integration tests.

use std::path::Path;

/// A scratch directory, on tmpfs when there is one. Tests that reopen logs hundreds of
/// times would otherwise spend their time in fsync on a real disk without testing
/// anything more; the SIGKILL test in `crash.rs` deliberately uses the real disk.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}
