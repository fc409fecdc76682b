//! Build slots counted across hook processes, as Nix's own hook does with lock files under
//! `current-load`: slot N of a builder is held while a process holds an `flock` on
//! `current-load/<builder>-<N>`. The kernel drops the lock when the holder dies, so a killed
//! hook never leaks a slot.

use std::path::{Path, PathBuf};

use crate::state::{FileLock, StateError};

#[derive(Debug)]
pub struct Slot {
    pub index: u32,
    _lock: FileLock,
}

fn slot_path(dir: &Path, builder: &str, i: u32) -> PathBuf {
    dir.join(format!("{builder}-{i}"))
}

/// Takes the first free slot of `builder`, if any. Returns the slot and how many were busy.
pub fn try_acquire(
    dir: &Path,
    builder: &str,
    max_jobs: u32,
) -> Result<(Option<Slot>, u32), StateError> {
    let mut busy = 0;
    let mut got = None;
    for i in 0..max_jobs {
        match FileLock::try_exclusive(&slot_path(dir, builder, i))? {
            Some(mut lock) if got.is_none() => {
                lock.note(&format!("{}\n", std::process::id()));
                got = Some(Slot {
                    index: i,
                    _lock: lock,
                });
            }
            Some(_) => {}
            None => busy += 1,
        }
    }
    Ok((got, busy))
}

/// How many slots of `builder` are held right now.
pub fn busy_count(dir: &Path, builder: &str, max_jobs: u32) -> Result<u32, StateError> {
    let mut busy = 0;
    for i in 0..max_jobs {
        if FileLock::try_exclusive(&slot_path(dir, builder, i))?.is_none() {
            busy += 1;
        }
    }
    Ok(busy)
}

/// Holds every slot of a builder, so nobody starts a build on it meanwhile; `None` while any
/// build holds one. Used before recreating a container.
pub fn try_acquire_all(
    dir: &Path,
    builder: &str,
    max_jobs: u32,
) -> Result<Option<Vec<FileLock>>, StateError> {
    try_acquire_all_except(dir, builder, max_jobs, None)
}

/// Like [`try_acquire_all`], but skips slot `except`: the caller's own, already held.
pub fn try_acquire_all_except(
    dir: &Path,
    builder: &str,
    max_jobs: u32,
    except: Option<u32>,
) -> Result<Option<Vec<FileLock>>, StateError> {
    let mut all = Vec::with_capacity(max_jobs as usize);
    for i in (0..max_jobs).filter(|i| Some(*i) != except) {
        match FileLock::try_exclusive(&slot_path(dir, builder, i))? {
            Some(l) => all.push(l),
            None => return Ok(None),
        }
    }
    Ok(Some(all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fill_up_and_free_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let (a, busy) = try_acquire(d.path(), "b", 2).unwrap();
        assert_eq!((a.as_ref().map(|s| s.index), busy), (Some(0), 0));
        let (b, busy) = try_acquire(d.path(), "b", 2).unwrap();
        assert_eq!((b.as_ref().map(|s| s.index), busy), (Some(1), 1));
        let (c, busy) = try_acquire(d.path(), "b", 2).unwrap();
        assert!(c.is_none());
        assert_eq!(busy, 2);
        assert!(try_acquire_all(d.path(), "b", 2).unwrap().is_none());
        drop(a);
        assert_eq!(busy_count(d.path(), "b", 2).unwrap(), 1);
        drop(b);
        assert!(try_acquire_all(d.path(), "b", 2).unwrap().is_some());
    }
}
