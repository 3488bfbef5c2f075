//! The worker's identity: a UUID v4 made on first start and kept in
//! `<data_dir>/worker-id`, so that a restarted worker comes back under the same id
//! (the coordinators then count a new incarnation of it, not a new worker).
//!
//! The file is written atomically (a temporary file, fsync, rename), so a crash
//! while writing leaves either no id or the whole id, never half of one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Name of the file, inside the data directory, that holds the worker id.
pub const WORKER_ID_FILE: &str = "worker-id";

/// A failure to load or create the worker id; each case names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data directory could not be created.
    #[error("create data dir {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    /// The id file exists but could not be read.
    #[error("read worker id {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The id file holds something other than a UUID.
    #[error("worker id file {path} is corrupt ({reason}); restore it or delete it to start as a new worker")]
    Corrupt { path: PathBuf, reason: String },
    /// The id file could not be written.
    #[error("write worker id {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Returns the worker id kept in `data_dir`, creating the directory and a fresh id
/// on first start.
pub fn load_or_create(data_dir: &Path) -> Result<Uuid, IdentityError> {
    fs::create_dir_all(data_dir).map_err(|source| IdentityError::CreateDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let path = data_dir.join(WORKER_ID_FILE);
    match fs::read(&path) {
        Ok(bytes) => parse(&path, &bytes),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let id = Uuid::new_v4();
            write_atomically(&path, &id)?;
            tracing::info!(worker_id = %id, path = %path.display(), "created worker id");
            Ok(id)
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Uuid, IdentityError> {
    let corrupt = |reason: String| IdentityError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8 text".into()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(corrupt("empty file".into()));
    }
    let id = Uuid::parse_str(text).map_err(|e| corrupt(format!("not a UUID: {e}")))?;
    if id.is_nil() {
        return Err(corrupt("the nil UUID is not a worker id".into()));
    }
    Ok(id)
}

fn write_atomically(path: &Path, id: &Uuid) -> Result<(), IdentityError> {
    let write_error = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp).map_err(write_error)?;
    file.write_all(format!("{id}\n").as_bytes())
        .map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    fs::rename(&temp, path).map_err(write_error)?;
    // The rename is durable only once the directory entry is; some platforms cannot
    // open a directory for syncing, and the id is then merely as durable as the
    // filesystem makes renames by default.
    if let Some(dir) = path.parent() {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_survives_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("nested").join("data");
        let first = load_or_create(&data_dir).expect("first start");
        assert_eq!(first.get_version_num(), 4);
        let second = load_or_create(&data_dir).expect("restart");
        assert_eq!(first, second);
        let text = fs::read_to_string(data_dir.join(WORKER_ID_FILE)).expect("id file");
        assert_eq!(text.trim(), first.to_string());
        assert!(
            !data_dir.join("worker-id.tmp").exists(),
            "the temporary file is renamed away"
        );
    }

    #[test]
    fn two_data_dirs_get_different_ids() {
        let a = tempfile::tempdir().expect("temp dir");
        let b = tempfile::tempdir().expect("temp dir");
        assert_ne!(
            load_or_create(a.path()).expect("a"),
            load_or_create(b.path()).expect("b")
        );
    }

    #[test]
    fn empty_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(WORKER_ID_FILE);
        fs::write(&path, "  \n").expect("write");
        let err = load_or_create(dir.path()).expect_err("empty id file");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("empty file"), "{text}");
        // The corrupt file is left for the operator, not replaced.
        assert_eq!(fs::read_to_string(&path).expect("read"), "  \n");
    }

    #[test]
    fn garbage_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(WORKER_ID_FILE);
        fs::write(&path, b"not-a-uuid\0\0").expect("write");
        let err = load_or_create(dir.path()).expect_err("corrupt id file");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn an_existing_id_is_kept_as_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = Uuid::new_v4();
        fs::write(dir.path().join(WORKER_ID_FILE), format!("{id}\n")).expect("write");
        assert_eq!(load_or_create(dir.path()).expect("load"), id);
    }
}
