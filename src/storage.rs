//! Log segments as files: `<data>/log/<base record index, 20 digits>.seg`.
//!
//! Writes are positioned (`pwrite`); `sync` is `fdatasync`. Creating or removing a
//! segment syncs the directory so the file's existence is durable too.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use weftlog_proto::log::Storage;

/// Segments in one directory.
#[derive(Debug)]
pub struct FileStorage {
    dir: PathBuf,
    open: BTreeMap<u64, File>,
}

impl FileStorage {
    /// Storage in `dir`, which is created if missing.
    pub fn new(dir: &Path) -> io::Result<FileStorage> {
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(FileStorage {
            dir: dir.to_path_buf(),
            open: BTreeMap::new(),
        })
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:020}.seg"))
    }

    fn file(&mut self, segment: u64) -> io::Result<&mut File> {
        if !self.open.contains_key(&segment) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path(segment))?;
            self.open.insert(segment, f);
        }
        Ok(self.open.get_mut(&segment).expect("inserted above"))
    }
}

/// fsyncs a directory, making the creation or removal of its entries durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Storage for FileStorage {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                out.push(n);
            }
        }
        Ok(out)
    }

    fn read(&mut self, segment: u64) -> io::Result<Vec<u8>> {
        fs::read(self.path(segment))
    }

    fn create(&mut self, segment: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(segment))?;
        sync_dir(&self.dir)?;
        self.open.insert(segment, f);
        Ok(())
    }

    fn read_at(&mut self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.file(segment)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn write_at(&mut self, segment: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file(segment)?.write_all_at(data, offset)
    }

    fn sync_data(&mut self, segment: u64) -> io::Result<()> {
        self.file(segment)?.sync_data()
    }

    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()> {
        let f = self.file(segment)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&mut self, segment: u64) -> io::Result<()> {
        self.open.remove(&segment);
        fs::remove_file(self.path(segment))?;
        sync_dir(&self.dir)
    }
}
