//! Registering paths in the local store's SQLite database (`ValidPaths`, `Refs`, with a fixed
//! output's content address in `ValidPaths.ca`: [`CaColumn::register`]), and recording the
//! content address of a path `nix-store --register-validity` registered ([`CaColumn::set`]).
//!
//! `nix-store --register-validity` cannot express a content address, and every Nix route that
//! can (the daemon's `AddToStoreNar`, `nix-store --import`) takes the output locks the calling
//! Nix holds (see the module above). So right after `--register-validity` the hook sets the
//! column itself: one transaction, one `UPDATE ValidPaths SET ca = ? WHERE path = ?` per path,
//! each required to change exactly one row. This is the column Nix's own `registerValidPath`
//! writes (`ValidPaths.ca`, schema version 10 in Nix 2.8, 2.26 and 2.34); Nix reads it on every
//! `queryPathInfo` from the database (each daemon connection is a fresh process, and the
//! calling Nix reads the outputs only after the hook exits), so nothing caches the old row.
//!
//! The database is opened, and its schema version checked, *before* anything is registered, so
//! an unknown schema or an unusable database fails the import with nothing registered. Like
//! every Nix process using the database, the hook holds a shared lock on `db/big-lock` from
//! the check to the write, so no schema migration can run in between. Waits
//! for SQLite's lock are bounded by a busy timeout, and the whole write is interrupted at the
//! deadline (SQLite then rolls it back).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// The `ValidPaths` layout this module knows (`nixSchemaVersion` in `local-store.hh`: 10 from
/// Nix 2.0 through at least 2.34).
pub const KNOWN_SCHEMA: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum CaColumnError {
    #[error("cannot read the Nix database schema version from '{}': {source}", path.display())]
    Schema {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the Nix database '{}' has schema version '{found}', which nixdock does not know (it knows {KNOWN_SCHEMA}); nixdock cannot record content addresses there, so it registers nothing. Update nixdock for this Nix version.",
        path.display()
    )]
    UnknownSchema { path: PathBuf, found: String },
    #[error("the Nix database '{}': {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the Nix database '{}' has no row for '{store_path}'", path.display())]
    NoRow { path: PathBuf, store_path: String },
    #[error("cannot register '{referrer}': its reference '{reference}' is not valid")]
    ReferenceNotValid { referrer: String, reference: String },
    #[error("cannot register {paths}: their references form a cycle")]
    Cycle { paths: String },
    #[error(
        "the Nix database '{}' stayed busy or slow for {after:?}; the write was abandoned",
        path.display()
    )]
    TimedOut { path: PathBuf, after: Duration },
}

/// Nix's state directory: `NIX_STATE_DIR` from the environment Nix gave the hook (as Nix
/// itself reads it), else `/nix/var/nix`.
pub fn nix_state_dir() -> PathBuf {
    match std::env::var_os("NIX_STATE_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        _ => PathBuf::from("/nix/var/nix"),
    }
}

/// An open connection to the local store's database, schema checked.
pub struct CaColumn {
    conn: Connection,
    db: PathBuf,
    timeout: Duration,
    /// A shared lock on `db/big-lock`, as every Nix process holds one while it uses the
    /// database, so that no schema migration (which takes it exclusively) runs between the
    /// schema check and the write. Released on drop.
    _big_lock: Option<std::fs::File>,
}

/// Takes a shared `flock` on `<state_dir>/db/big-lock` (Nix's `globalLock`), waiting up to
/// `timeout`. A missing file means no Nix has opened this database yet, so nothing to wait for.
fn lock_shared(
    state_dir: &Path,
    timeout: Duration,
) -> Result<Option<std::fs::File>, CaColumnError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("db/big-lock");
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CaColumnError::Schema { path, source }),
    };
    let start = std::time::Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return Ok(Some(file));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(CaColumnError::Schema { path, source: err });
        }
        if start.elapsed() > timeout {
            return Err(CaColumnError::TimedOut {
                path,
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl CaColumn {
    /// Opens `<state_dir>/db/db.sqlite` read-write (never creating it) after checking
    /// `<state_dir>/db/schema`; lock waits are bounded by `timeout`.
    pub fn open(state_dir: &Path, timeout: Duration) -> Result<CaColumn, CaColumnError> {
        let big_lock = lock_shared(state_dir, timeout)?;
        let schema_file = state_dir.join("db/schema");
        let found =
            std::fs::read_to_string(&schema_file).map_err(|source| CaColumnError::Schema {
                path: schema_file.clone(),
                source,
            })?;
        let db = state_dir.join("db/db.sqlite");
        if found.trim().parse::<u32>().ok() != Some(KNOWN_SCHEMA) {
            return Err(CaColumnError::UnknownSchema {
                path: db,
                found: found.trim().chars().take(40).collect(),
            });
        }
        let sql = |source| CaColumnError::Sqlite {
            path: db.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(timeout).map_err(sql)?;
        // What Nix sets on its own connections (with `fsync-metadata`, the default).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // The column must be there (it is in every schema-10 database).
        let has_ca: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('ValidPaths') WHERE name = 'ca'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql)?
            == 1;
        if !has_ca {
            return Err(CaColumnError::UnknownSchema {
                path: db,
                found: format!("{KNOWN_SCHEMA} without a ValidPaths.ca column"),
            });
        }
        Ok(CaColumn {
            conn,
            db,
            timeout,
            _big_lock: big_lock,
        })
    }

    /// Registers `paths` as valid in one transaction, writing exactly the rows
    /// `nix-store --register-validity --hash-given` writes for them (`LocalStore::
    /// registerValidPaths` → `addValidPath`, then `AddReference` for each reference) and, for a
    /// fixed output, its `ca`, which that command cannot express: `ValidPaths (path, hash,
    /// registrationTime, deriver, narSize, ultimate, sigs, ca)` = the path, `sha256:<base16>`,
    /// now, the deriver or NULL, the NAR size (NULL if 0), NULL (not ultimate), NULL, the
    /// content address or NULL; `Refs (referrer, reference)` by row id, `insert or replace` as Nix does. A path
    /// already valid is left as it is (the command skips those too, without `--reregister`).
    /// Every reference must be valid or in `paths`, and `paths` may not reference each other in
    /// a cycle (Nix's topological sort refuses that); otherwise nothing is registered.
    /// Derivations (`.drv`), whose registration also fills `DerivationOutputs`, are not
    /// handled here.
    pub fn register(&mut self, paths: &[NewPath]) -> Result<(), CaColumnError> {
        let db = self.db.clone();
        let sql = |source| CaColumnError::Sqlite {
            path: db.clone(),
            source,
        };
        if let Some(cycle) = find_cycle(paths) {
            return Err(CaColumnError::Cycle { paths: cycle });
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.guarded(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            {
                let mut id_of = tx
                    .prepare("SELECT id FROM ValidPaths WHERE path = ?1")
                    .map_err(sql)?;
                let mut insert = tx
                    .prepare(
                        "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, \
                         ultimate, sigs, ca) VALUES (?1, ?2, ?3, ?4, ?5, NULL, NULL, ?6)",
                    )
                    .map_err(sql)?;
                let mut add_ref = tx
                    .prepare("INSERT OR REPLACE INTO Refs (referrer, reference) VALUES (?1, ?2)")
                    .map_err(sql)?;
                let mut added: Vec<(&NewPath, i64)> = Vec::new();
                for p in paths {
                    let exists = id_of
                        .query_row([&p.path], |r| r.get::<_, i64>(0))
                        .map(Some)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(None),
                            e => Err(e),
                        })
                        .map_err(sql)?;
                    if exists.is_some() {
                        continue;
                    }
                    let size = (p.nar_size != 0).then_some(p.nar_size as i64);
                    insert
                        .execute(rusqlite::params![
                            p.path,
                            format!("sha256:{}", p.nar_hash_base16),
                            now,
                            p.deriver,
                            size,
                            p.ca,
                        ])
                        .map_err(sql)?;
                    added.push((p, tx.last_insert_rowid()));
                }
                for (p, referrer) in &added {
                    for r in &p.references {
                        let reference = id_of.query_row([r], |row| row.get::<_, i64>(0)).map_err(
                            |e| match e {
                                rusqlite::Error::QueryReturnedNoRows => {
                                    CaColumnError::ReferenceNotValid {
                                        referrer: p.path.clone(),
                                        reference: r.clone(),
                                    }
                                }
                                e => sql(e),
                            },
                        )?;
                        add_ref.execute([referrer, &reference]).map_err(sql)?;
                    }
                }
            }
            tx.commit().map_err(sql)
        })
    }

    /// Runs `work` on the connection, interrupted if it outlives the deadline (a busy timeout
    /// covers lock waits only); an interrupted transaction is rolled back.
    fn guarded(
        &mut self,
        work: impl FnOnce(&mut Connection) -> Result<(), CaColumnError>,
    ) -> Result<(), CaColumnError> {
        let interrupt = self.conn.get_interrupt_handle();
        let deadline = self.timeout + Duration::from_secs(5);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(deadline).is_err() {
                interrupt.interrupt();
            }
        });
        let result = work(&mut self.conn);
        let _ = done_tx.send(());
        let _ = watchdog.join();
        match result {
            Err(CaColumnError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            }) if matches!(
                e.code,
                rusqlite::ErrorCode::OperationInterrupted | rusqlite::ErrorCode::DatabaseBusy
            ) =>
            {
                Err(CaColumnError::TimedOut {
                    path: self.db.clone(),
                    after: self.timeout,
                })
            }
            r => r,
        }
    }

    /// Sets `ca` for each `(store path, content address)` in one transaction; every path must
    /// have a row. On error nothing is changed.
    pub fn set(&mut self, rows: &[(String, String)]) -> Result<(), CaColumnError> {
        let db = self.db.clone();
        let sql = |source| CaColumnError::Sqlite {
            path: db.clone(),
            source,
        };
        self.guarded(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            {
                let mut stmt = tx
                    .prepare("UPDATE ValidPaths SET ca = ?1 WHERE path = ?2")
                    .map_err(sql)?;
                for (path, ca) in rows {
                    if stmt.execute([ca, path]).map_err(sql)? != 1 {
                        return Err(CaColumnError::NoRow {
                            path: db.clone(),
                            store_path: path.clone(),
                        });
                    }
                }
            }
            tx.commit().map_err(sql)
        })
    }
}

/// One path for [`CaColumn::register`]; paths are absolute.
pub struct NewPath {
    pub path: String,
    /// The SHA-256 of its NAR, base 16.
    pub nar_hash_base16: String,
    pub nar_size: u64,
    pub deriver: Option<String>,
    pub references: Vec<String>,
    /// Its content address, rendered (`fixed:r:sha256:…`).
    pub ca: Option<String>,
}

/// A cycle among `paths`' references to each other (a self-reference is not one), named.
fn find_cycle(paths: &[NewPath]) -> Option<String> {
    use std::collections::BTreeMap;
    let index: BTreeMap<&str, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.as_str(), i))
        .collect();
    // 0: not seen, 1: on the current path, 2: done.
    let mut mark = vec![0u8; paths.len()];
    fn visit(i: usize, paths: &[NewPath], index: &BTreeMap<&str, usize>, mark: &mut [u8]) -> bool {
        mark[i] = 1;
        for r in &paths[i].references {
            let Some(&j) = index.get(r.as_str()) else {
                continue;
            };
            if j == i {
                continue;
            }
            if mark[j] == 1 || (mark[j] == 0 && visit(j, paths, index, mark)) {
                return true;
            }
        }
        mark[i] = 2;
        false
    }
    (0..paths.len())
        .any(|i| mark[i] == 0 && visit(i, paths, &index, &mut mark))
        .then(|| {
            paths
                .iter()
                .map(|p| format!("'{}'", p.path))
                .collect::<Vec<_>>()
                .join(", ")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_db(dir: &Path, schema: &str, with_ca: bool) {
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("db/schema"), schema).unwrap();
        let c = Connection::open(dir.join("db/db.sqlite")).unwrap();
        let ca = if with_ca { ", ca text" } else { "" };
        c.execute_batch(&format!(
            "create table ValidPaths (id integer primary key autoincrement not null, \
             path text unique not null, hash text not null, registrationTime integer not null, \
             deriver text, narSize integer, ultimate integer, sigs text{ca});
             insert into ValidPaths (path, hash, registrationTime) values ('/nix/store/a', 'x', 1);
             insert into ValidPaths (path, hash, registrationTime) values ('/nix/store/b', 'x', 1);"
        ))
        .unwrap();
    }

    fn ca_of(dir: &Path, p: &str) -> Option<String> {
        Connection::open(dir.join("db/db.sqlite"))
            .unwrap()
            .query_row("select ca from ValidPaths where path = ?1", [p], |r| {
                r.get(0)
            })
            .unwrap()
    }

    #[test]
    fn sets_all_rows_in_one_transaction_or_none() {
        let t = tempfile::tempdir().unwrap();
        make_db(t.path(), "10", true);
        let mut c = CaColumn::open(t.path(), Duration::from_secs(5)).unwrap();
        c.set(&[
            ("/nix/store/a".into(), "fixed:sha256:x".into()),
            ("/nix/store/b".into(), "fixed:r:sha1:y".into()),
        ])
        .unwrap();
        assert_eq!(
            ca_of(t.path(), "/nix/store/a").as_deref(),
            Some("fixed:sha256:x")
        );
        assert_eq!(
            ca_of(t.path(), "/nix/store/b").as_deref(),
            Some("fixed:r:sha1:y")
        );
        // A path without a row rolls back the ones before it.
        let e = c
            .set(&[
                ("/nix/store/a".into(), "changed".into()),
                ("/nix/store/missing".into(), "z".into()),
            ])
            .unwrap_err();
        assert!(matches!(e, CaColumnError::NoRow { .. }), "{e}");
        assert_eq!(
            ca_of(t.path(), "/nix/store/a").as_deref(),
            Some("fixed:sha256:x")
        );
    }

    #[test]
    fn unknown_schema_or_missing_database_is_refused() {
        let t = tempfile::tempdir().unwrap();
        make_db(t.path(), "11\n", true);
        let e = CaColumn::open(t.path(), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(matches!(e, CaColumnError::UnknownSchema { .. }), "{e}");
        assert!(e.to_string().contains("'11'"), "{e}");

        let t = tempfile::tempdir().unwrap();
        make_db(t.path(), "10", false);
        assert!(matches!(
            CaColumn::open(t.path(), Duration::from_secs(1)),
            Err(CaColumnError::UnknownSchema { .. })
        ));

        // Never creates a database.
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("db")).unwrap();
        std::fs::write(t.path().join("db/schema"), "10").unwrap();
        assert!(matches!(
            CaColumn::open(t.path(), Duration::from_secs(1)),
            Err(CaColumnError::Sqlite { .. })
        ));
        assert!(!t.path().join("db/db.sqlite").exists());
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            CaColumn::open(t.path(), Duration::from_secs(1)),
            Err(CaColumnError::Schema { .. })
        ));
    }

    #[test]
    fn a_migration_holding_the_big_lock_is_waited_for() {
        use std::os::fd::AsRawFd;
        let t = tempfile::tempdir().unwrap();
        make_db(t.path(), "10", true);
        let lock = std::fs::File::create(t.path().join("db/big-lock")).unwrap();
        // SAFETY: flock on our own descriptor.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert!(matches!(
            CaColumn::open(t.path(), Duration::from_millis(200)),
            Err(CaColumnError::TimedOut { .. })
        ));
        drop(lock);
        let mut c = CaColumn::open(t.path(), Duration::from_secs(5)).unwrap();
        c.set(&[("/nix/store/a".into(), "x".into())]).unwrap();
    }

    #[test]
    fn a_held_lock_times_out() {
        let t = tempfile::tempdir().unwrap();
        make_db(t.path(), "10", true);
        let holder = Connection::open(t.path().join("db/db.sqlite")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut c = CaColumn::open(t.path(), Duration::from_millis(200)).unwrap();
        let e = c.set(&[("/nix/store/a".into(), "x".into())]).unwrap_err();
        assert!(matches!(e, CaColumnError::TimedOut { .. }), "{e}");
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(ca_of(t.path(), "/nix/store/a"), None);
    }
}
