//! Fault injection for the storage engine's file I/O, and a crash model, for tests.
//!
//! Every file operation of this crate goes through the functions of this module. While
//! no [`Injector`] is registered they cost one relaxed atomic load on top of the system
//! call. An [`Injector`] registered for a directory sees the operations on paths under
//! it (other tests' directories are unaffected, so tests run in parallel), counts them
//! by [`Op`], and makes a chosen one fail with a chosen [`Fault`]: an error (EIO),
//! a full disk (ENOSPC) or a short write followed by an error. It can also hold a chosen
//! operation before it runs ([`Injector::pause_nth`]), so a test can act while, say, an
//! fsync is in progress, without sleeping.
//!
//! With [`Injector::with_crash_model`] it also keeps a durable copy of the directory
//! next to the live one, as redb's crash tests do: a file's content becomes durable
//! when it is fdatasynced or fsynced, a directory's entries when the directory is
//! fsynced. [`Injector::crash`] then rewrites the directory to its durable copy, which is
//! what a power loss leaves: unsynced writes gone, files created (or removed) since the
//! last fsync of their directory gone (or back). File contents are tracked per inode, so
//! a renamed file keeps the content synced under its old name. The model assumes inode
//! numbers are not reused while the injector lives (true of tmpfs, which the tests use).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

/// A kind of file operation that can be counted and made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A positional or sequential write of file data.
    Write,
    /// `fdatasync` or `fsync` of a file, or `msync` of a mapping of one.
    Sync,
    /// A change of a file's length (`ftruncate`), shrinking or growing.
    SetLen,
    /// `fsync` of a directory.
    SyncDir,
    /// Creating a directory.
    CreateDir,
    /// Removing a file.
    Remove,
    /// Renaming a file.
    Rename,
    /// A read of file data.
    Read,
    /// Opening or creating a file, or opening a directory to fsync it: where a process
    /// out of file descriptors (EMFILE) or memory meets its limit.
    Open,
}

const OPS: usize = 9;

impl Op {
    fn slot(self) -> usize {
        self as usize
    }
}

/// What an injected failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The `errno` the operation fails with.
    pub errno: i32,
    /// For a write: bytes stored before the error (a short write). Others store nothing.
    pub stored: usize,
}

/// `EIO`: what a failing disk returns.
pub const EIO: i32 = 5;
/// `ENOSPC`: no space left on the device.
pub const ENOSPC: i32 = 28;
/// `EMFILE`: the process has as many file descriptors open as its limit allows.
pub const EMFILE: i32 = 24;

impl Fault {
    /// The operation fails with EIO and changes nothing.
    pub fn eio() -> Fault {
        Fault {
            errno: EIO,
            stored: 0,
        }
    }

    /// The operation fails with ENOSPC and changes nothing.
    pub fn no_space() -> Fault {
        Fault {
            errno: ENOSPC,
            stored: 0,
        }
    }

    /// The operation fails with EMFILE (for [`Op::Open`]: too many open files).
    pub fn too_many_open_files() -> Fault {
        Fault {
            errno: EMFILE,
            stored: 0,
        }
    }

    /// A write stores its first `stored` bytes, then fails with ENOSPC, as a write that
    /// fills the disk does.
    pub fn short_write(stored: usize) -> Fault {
        Fault {
            errno: ENOSPC,
            stored,
        }
    }

    fn error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

#[derive(Debug)]
struct Armed {
    op: Op,
    /// Fails the operation with this count (1-based, since the injector was made).
    at: u64,
    /// Keeps failing every later operation of the kind too, until cleared.
    sticky: bool,
    fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File(u64),
}

#[derive(Debug, Default)]
struct Durable {
    /// Durable content by inode number.
    contents: HashMap<u64, Vec<u8>>,
    /// Durable entries of each directory under the root (the root included).
    dirs: HashMap<PathBuf, BTreeMap<OsString, Entry>>,
}

/// Where a paused operation waits: `reached` once one waits there, `released` once it
/// may go on.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, (bool, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the paused operation: says it is here, waits for the release.
    fn hold(&self) {
        let mut state = self.lock();
        state.0 = true;
        self.changed.notify_all();
        while !state.1 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn release(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }
}

/// An operation [`Injector::pause_nth`] holds before it runs. Released by
/// [`Paused::release`] or when dropped, so a failing test never leaves a thread stuck.
#[derive(Debug)]
pub struct Paused {
    gate: Arc<Gate>,
}

impl Paused {
    /// Blocks until the paused operation has been reached and is waiting.
    pub fn wait_reached(&self) {
        let mut state = self.gate.lock();
        while !state.0 {
            state = self
                .gate
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets the paused operation run.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.gate.release();
    }
}

#[derive(Debug, Default)]
struct State {
    counts: [u64; OPS],
    armed: Vec<Armed>,
    /// Operations to hold before they run: kind, count, gate.
    paused: Vec<(Op, u64, Arc<Gate>)>,
    injected: u64,
    synced_dirs: Vec<PathBuf>,
    durable: Option<Durable>,
}

#[derive(Debug)]
struct Plan {
    root: PathBuf,
    state: Mutex<State>,
}

impl Plan {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

static REGISTERED: AtomicUsize = AtomicUsize::new(0);
static REGISTRY: Mutex<Vec<Weak<Plan>>> = Mutex::new(Vec::new());

/// The plan of the injector whose root holds `path`, if any.
fn plan_for(path: &Path) -> Option<Arc<Plan>> {
    if REGISTERED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    registry
        .iter()
        .filter_map(Weak::upgrade)
        .find(|plan| path.starts_with(&plan.root))
}

/// Counts an operation on `path` and returns the fault to inject, if one is due.
fn intercept(op: Op, path: &Path) -> Option<(Arc<Plan>, Option<Fault>)> {
    let plan = plan_for(path)?;
    let fault = {
        let mut state = plan.lock();
        state.counts[op.slot()] += 1;
        let n = state.counts[op.slot()];
        let due = state
            .armed
            .iter()
            .position(|a| a.op == op && (a.at == n || (a.sticky && a.at <= n)));
        let fault = due.map(|i| {
            let fault = state.armed[i].fault;
            if !state.armed[i].sticky {
                state.armed.swap_remove(i);
            }
            fault
        });
        if fault.is_some() {
            state.injected += 1;
        }
        let pause = state.paused.iter().position(|p| p.0 == op && p.1 == n);
        let gate = pause.map(|i| state.paused.swap_remove(i).2);
        drop(state);
        if let Some(gate) = gate {
            gate.hold();
        }
        fault
    };
    Some((plan, fault))
}

/// Injects faults into the file operations under one directory; see the module
/// documentation. Dropping it unregisters it.
#[derive(Debug)]
pub struct Injector {
    plan: Arc<Plan>,
}

impl Injector {
    /// Registers an injector for every path under `root`, which must exist.
    pub fn new(root: &Path) -> io::Result<Injector> {
        let root = root.canonicalize()?;
        let plan = Arc::new(Plan {
            root,
            state: Mutex::new(State::default()),
        });
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry.retain(|w| w.strong_count() > 0);
        if registry
            .iter()
            .filter_map(Weak::upgrade)
            .any(|p| p.root.starts_with(&plan.root) || plan.root.starts_with(&p.root))
        {
            return Err(io::Error::other(
                "another injector covers an overlapping directory",
            ));
        }
        registry.push(Arc::downgrade(&plan));
        REGISTERED.fetch_add(1, Ordering::Relaxed);
        Ok(Injector { plan })
    }

    /// Also keeps the durable copy that [`Injector::crash`] restores. What is in the
    /// directory now counts as durable.
    pub fn with_crash_model(self) -> io::Result<Injector> {
        let durable = snapshot(&self.plan.root)?;
        self.plan.lock().durable = Some(durable);
        Ok(self)
    }

    /// The directory the injector watches (canonical). Paths handed to the code under
    /// test must be under it, as spelled here.
    pub fn root(&self) -> &Path {
        &self.plan.root
    }

    /// Makes the `nth` operation of kind `op` from now (1 = the next one) fail.
    pub fn fail_nth(&self, op: Op, nth: u64, fault: Fault) {
        let mut state = self.plan.lock();
        let at = state.counts[op.slot()] + nth.max(1);
        state.armed.push(Armed {
            op,
            at,
            sticky: false,
            fault,
        });
    }

    /// Makes every operation of kind `op` from the `nth` on fail, until
    /// [`Injector::clear`]: a disk that stays full or broken.
    pub fn fail_from(&self, op: Op, nth: u64, fault: Fault) {
        let mut state = self.plan.lock();
        let at = state.counts[op.slot()] + nth.max(1);
        state.armed.push(Armed {
            op,
            at,
            sticky: true,
            fault,
        });
    }

    /// Holds the `nth` operation of kind `op` from now (1 = the next one) before it
    /// runs, in the thread doing it, until the returned [`Paused`] is released.
    pub fn pause_nth(&self, op: Op, nth: u64) -> Paused {
        let mut state = self.plan.lock();
        let at = state.counts[op.slot()] + nth.max(1);
        let gate = Arc::new(Gate::default());
        state.paused.push((op, at, Arc::clone(&gate)));
        Paused { gate }
    }

    /// Disarms every pending fault.
    pub fn clear(&self) {
        self.plan.lock().armed.clear();
    }

    /// Operations of kind `op` seen so far.
    pub fn count(&self, op: Op) -> u64 {
        self.plan.lock().counts[op.slot()]
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.plan.lock().injected
    }

    /// Directories fsynced so far, in order.
    pub fn synced_dirs(&self) -> Vec<PathBuf> {
        self.plan.lock().synced_dirs.clone()
    }

    /// Rewrites the directory to its durable copy: what a power loss now would leave.
    /// Everything using files under it must have been dropped. Disarms pending faults;
    /// afterwards the restored state counts as durable.
    pub fn crash(&self) -> io::Result<()> {
        let mut state = self.plan.lock();
        state.armed.clear();
        let durable = state
            .durable
            .take()
            .ok_or_else(|| io::Error::other("the injector keeps no crash model"))?;
        restore(&self.plan.root, &durable)?;
        state.durable = Some(snapshot(&self.plan.root)?);
        Ok(())
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry.retain(|w| w.upgrade().is_some_and(|p| !Arc::ptr_eq(&p, &self.plan)));
        REGISTERED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Records every directory and file under `root` as durable.
fn snapshot(root: &Path) -> io::Result<Durable> {
    let mut durable = Durable::default();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = list(&dir)?;
        for (name, entry) in &entries {
            match entry {
                Entry::Dir => pending.push(dir.join(name)),
                Entry::File(ino) => {
                    durable.contents.insert(*ino, fs::read(dir.join(name))?);
                }
            }
        }
        durable.dirs.insert(dir, entries);
    }
    Ok(durable)
}

fn list(dir: &Path) -> io::Result<BTreeMap<OsString, Entry>> {
    let mut entries = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let kind = if meta.is_dir() {
            Entry::Dir
        } else {
            Entry::File(meta.ino())
        };
        entries.insert(entry.file_name(), kind);
    }
    Ok(entries)
}

fn restore(dir: &Path, durable: &Durable) -> io::Result<()> {
    let empty = BTreeMap::new();
    let wanted = durable.dirs.get(dir).unwrap_or(&empty);
    for (name, entry) in list(dir)? {
        if wanted.get(&name).map(|e| matches!(e, Entry::Dir)) != Some(matches!(entry, Entry::Dir)) {
            let path = dir.join(&name);
            match entry {
                Entry::Dir => fs::remove_dir_all(&path)?,
                Entry::File(_) => fs::remove_file(&path)?,
            }
        }
    }
    for (name, entry) in wanted {
        let path = dir.join(name);
        match entry {
            Entry::Dir => {
                if !path.is_dir() {
                    fs::create_dir(&path)?;
                }
                restore(&path, durable)?;
            }
            Entry::File(ino) => {
                let content = durable.contents.get(ino).map_or(&[][..], |c| &c[..]);
                fs::write(&path, content)?;
            }
        }
    }
    Ok(())
}

/// Records the content of a file just synced (read through its path: the handle may be
/// write-only) as durable. `file` is the synced handle, if the sync went through one.
fn record_file_sync(plan: &Plan, file: Option<&File>, path: &Path) -> io::Result<()> {
    let mut state = plan.lock();
    if let Some(durable) = &mut state.durable {
        let ino = fs::metadata(path)?.ino();
        if file.is_some_and(|f| f.metadata().is_ok_and(|m| m.ino() != ino)) {
            return Err(io::Error::other(format!(
                "crash model: {} no longer names the file being synced",
                path.display()
            )));
        }
        durable.contents.insert(ino, fs::read(path)?);
    }
    Ok(())
}

// The operations the crate uses. Each counts itself and may fail as planned.

/// `pwrite` of all of `buf` at `position`.
pub(crate) fn write_all_at(file: &File, path: &Path, buf: &[u8], position: u64) -> io::Result<()> {
    if let Some((_, Some(fault))) = intercept(Op::Write, path) {
        let stored = fault.stored.min(buf.len());
        file.write_all_at(&buf[..stored], position)?;
        return Err(fault.error());
    }
    file.write_all_at(buf, position)
}

/// `pread` of exactly `buf.len()` bytes at `position`.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    position: u64,
) -> io::Result<()> {
    if let Some((_, Some(fault))) = intercept(Op::Read, path) {
        return Err(fault.error());
    }
    file.read_exact_at(buf, position)
}

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> io::Result<Vec<u8>> {
    if let Some((_, Some(fault))) = intercept(Op::Read, path) {
        return Err(fault.error());
    }
    fs::read(path)
}

/// `fdatasync`.
pub(crate) fn sync_data(file: &File, path: &Path) -> io::Result<()> {
    match intercept(Op::Sync, path) {
        None => file.sync_data(),
        Some((_, Some(fault))) => Err(fault.error()),
        Some((plan, None)) => {
            file.sync_data()?;
            record_file_sync(&plan, Some(file), path)
        }
    }
}

/// `fsync` of a file: its data and all its metadata.
pub(crate) fn sync_all(file: &File, path: &Path) -> io::Result<()> {
    match intercept(Op::Sync, path) {
        None => file.sync_all(),
        Some((_, Some(fault))) => Err(fault.error()),
        Some((plan, None)) => {
            file.sync_all()?;
            record_file_sync(&plan, Some(file), path)
        }
    }
}

/// `msync(MS_SYNC)` of the first `len` bytes of a shared mapping of `path`: on Linux, an
/// `fdatasync` of those bytes (the file's size included) that needs no descriptor.
pub(crate) fn sync_mapping(map: &memmap2::MmapRaw, len: usize, path: &Path) -> io::Result<()> {
    match intercept(Op::Sync, path) {
        None => map.flush_range(0, len),
        Some((_, Some(fault))) => Err(fault.error()),
        Some((plan, None)) => {
            map.flush_range(0, len)?;
            record_file_sync(&plan, None, path)
        }
    }
}

/// `ftruncate`.
pub(crate) fn set_len(file: &File, path: &Path, len: u64) -> io::Result<()> {
    if let Some((_, Some(fault))) = intercept(Op::SetLen, path) {
        return Err(fault.error());
    }
    file.set_len(len)
}

/// `fsync` of a directory.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    let plan = match intercept(Op::SyncDir, dir) {
        Some((_, Some(fault))) => return Err(fault.error()),
        Some((plan, None)) => Some(plan),
        None => None,
    };
    open(OpenOptions::new().read(true), dir)?.sync_all()?;
    if let Some(plan) = plan {
        let entries = list(dir)?;
        let mut state = plan.lock();
        state.synced_dirs.push(dir.to_path_buf());
        if let Some(durable) = &mut state.durable {
            durable.dirs.insert(dir.to_path_buf(), entries);
        }
    }
    Ok(())
}

/// `open(2)` of `path` with `options` (which may create it). A failed open creates
/// nothing.
pub(crate) fn open(options: &OpenOptions, path: &Path) -> io::Result<File> {
    if let Some((_, Some(fault))) = intercept(Op::Open, path) {
        return Err(fault.error());
    }
    options.open(path)
}

/// `mkdir` of one directory.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    if let Some((_, Some(fault))) = intercept(Op::CreateDir, dir) {
        return Err(fault.error());
    }
    fs::create_dir(dir)
}

/// `unlink`.
pub(crate) fn remove_file(path: &Path) -> io::Result<()> {
    if let Some((_, Some(fault))) = intercept(Op::Remove, path) {
        return Err(fault.error());
    }
    fs::remove_file(path)
}

/// `rename`.
pub(crate) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    if let Some((_, Some(fault))) = intercept(Op::Rename, to) {
        return Err(fault.error());
    }
    fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_fails_the_nth_operation_under_its_root_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let path = injector.root().join("f");
        let file = File::create(&path).expect("create");
        injector.fail_nth(Op::Write, 2, Fault::short_write(3));
        write_all_at(&file, &path, b"abcdef", 0).expect("first write");
        let e = write_all_at(&file, &path, b"ghijkl", 6).expect_err("second write");
        assert_eq!(e.raw_os_error(), Some(ENOSPC));
        assert_eq!(fs::read(&path).expect("read"), b"abcdefghi");
        write_all_at(&file, &path, b"x", 9).expect("third write");
        let outside = other.path().join("g");
        let g = File::create(&outside).expect("create");
        injector.fail_from(Op::Sync, 1, Fault::eio());
        sync_data(&g, &outside).expect("another directory is not affected");
        assert!(sync_data(&file, &path).is_err());
        assert!(sync_data(&file, &path).is_err());
        injector.clear();
        sync_data(&file, &path).expect("cleared");
        assert_eq!(injector.count(Op::Write), 3);
        assert_eq!(injector.count(Op::Sync), 3);
        assert_eq!(injector.injected(), 3);
    }

    /// An injected open failure creates nothing, as a real EMFILE does.
    #[test]
    fn a_failed_open_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let path = injector.root().join("new");
        let create = OpenOptions::new().write(true).create(true).clone();
        injector.fail_nth(Op::Open, 1, Fault::too_many_open_files());
        let e = open(&create, &path).expect_err("fails");
        assert_eq!(e.raw_os_error(), Some(EMFILE));
        assert!(!path.exists());
        open(&create, &path).expect("the next open works");
        assert!(path.exists());
        assert_eq!(injector.count(Op::Open), 2);
    }

    #[test]
    fn a_paused_operation_waits_for_its_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let path = injector.root().join("f");
        let file = File::create(&path).expect("create");
        let paused = injector.pause_nth(Op::Sync, 2);
        sync_data(&file, &path).expect("the first sync runs");
        let syncing = std::thread::spawn(move || {
            write_all_at(&file, &path, b"a", 0).expect("write");
            sync_data(&file, &path).expect("sync")
        });
        paused.wait_reached();
        // Counted, but held before it runs.
        assert_eq!(injector.count(Op::Sync), 2);
        assert!(!syncing.is_finished());
        paused.release();
        syncing.join().expect("the sync ran once released");
    }

    #[test]
    fn a_crash_keeps_only_what_was_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path())
            .expect("injector")
            .with_crash_model()
            .expect("crash model");
        let root = injector.root().to_path_buf();
        let synced = root.join("synced");
        let file = File::create(&synced).expect("create");
        write_all_at(&file, &synced, b"durable", 0).expect("write");
        sync_data(&file, &synced).expect("sync");
        sync_dir(&root).expect("sync dir");
        write_all_at(&file, &synced, b" and lost", 7).expect("write");
        let unlisted = root.join("unlisted");
        let other = File::create(&unlisted).expect("create");
        sync_data(&other, &unlisted).expect("content synced, entry not");
        let sub = root.join("sub");
        create_dir(&sub).expect("mkdir");
        drop((file, other));
        injector.crash().expect("crash");
        assert_eq!(fs::read(&synced).expect("read"), b"durable");
        assert!(!unlisted.exists() && !sub.exists());

        // A rename is durable once the directory is synced, with the content synced
        // under the old name.
        let tmp = root.join("tmp");
        let file = File::create(&tmp).expect("create");
        write_all_at(&file, &tmp, b"new", 0).expect("write");
        sync_data(&file, &tmp).expect("sync");
        rename(&tmp, &synced).expect("rename");
        drop(file);
        injector.crash().expect("crash before the directory sync");
        assert_eq!(fs::read(&synced).expect("read"), b"durable");
        let file = File::create(&tmp).expect("create");
        write_all_at(&file, &tmp, b"new", 0).expect("write");
        sync_data(&file, &tmp).expect("sync");
        rename(&tmp, &synced).expect("rename");
        sync_dir(&root).expect("sync dir");
        drop(file);
        injector.crash().expect("crash after it");
        assert_eq!(fs::read(&synced).expect("read"), b"new");
        assert!(!tmp.exists());
    }
}
