//! `Archive`: an opened checkpoint for Python — record lookup, small reads, and the
//! bulk reads into tensor memory, run on several threads with the GIL released.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::buffers::{MappedBuffer, OwnedBuffer};
use super::errors::at;
use super::num_threads;
use crate::container::reader::{
    Archive, Compression, FileSource, FileWindow, MemorySource, ReadJob, Source,
};
use crate::error::Error;
use crate::storage::{AlignedBuffer, MappedFile};

/// A Python buffer (bytes, bytearray, BytesIO.getbuffer(), ...) as a byte source.
struct PyBufferBytes(PyBuffer<u8>);

impl AsRef<[u8]> for PyBufferBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer was checked C-contiguous at construction and stays exported
        // (so its memory cannot move or shrink) until this wrapper is dropped.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, self.0.len_bytes()) }
    }
}

/// A `MappedFile` shared with the Python `MappedBuffer` that exports it.
struct SharedMap(std::sync::Arc<MappedFile>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

#[pyclass(name = "Archive", module = "fastserial._fastserial", frozen)]
pub struct PyArchive {
    pub(crate) archive: Archive,
    pub(crate) file: String,
    mapping: Option<Py<MappedBuffer>>,
}

impl PyArchive {
    fn open_source(
        py: Python<'_>,
        source: Box<dyn Source>,
        file: String,
        mapping: Option<Py<MappedBuffer>>,
        defer: bool,
    ) -> PyResult<Self> {
        let archive = py
            .allow_threads(|| {
                if defer {
                    Archive::open_deferring_data(source)
                } else {
                    Archive::open(source)
                }
            })
            .map_err(at(&file))?;
        Ok(PyArchive {
            archive,
            file,
            mapping,
        })
    }

    fn open_file(
        py: Python<'_>,
        file: File,
        mmap: bool,
        shared: bool,
        defer: bool,
        display: String,
    ) -> PyResult<Self> {
        if mmap {
            // SAFETY: documented mmap contract (MappedFile::map): only truncation of the
            // file by another process while mapped can fault; a shared mapping is what
            // the caller asked for (torch's MAP_SHARED option).
            let map = unsafe {
                if shared {
                    MappedFile::map_shared(&file)
                } else {
                    MappedFile::map(&file)
                }
            }
            .map_err(|e| at(&display)(Error::io("mapping the file", e)))?;
            let buffer = MappedBuffer::new(map);
            let shared = buffer.map.clone();
            let mapping = Py::new(py, buffer)?;
            Self::open_source(
                py,
                Box::new(MemorySource(SharedMap(shared))),
                display,
                Some(mapping),
                false,
            )
        } else {
            let src = FileSource::new(file)
                .map_err(|e| at(&display)(Error::io("reading file size", e)))?;
            Self::open_source(py, Box::new(src), display, None, defer)
        }
    }

    /// `open_file`, or with `window=(start, length)` an archive of those bytes of the
    /// file (read, never mapped; offsets relative to `start`).
    fn open_window_or_file(
        py: Python<'_>,
        file: File,
        mmap: bool,
        shared: bool,
        defer: bool,
        window: Option<(u64, u64)>,
        display: String,
    ) -> PyResult<Self> {
        let Some((start, len)) = window else {
            return Self::open_file(py, file, mmap, shared, defer, display);
        };
        if mmap {
            return Err(PyValueError::new_err(
                "a window of a file is read, not mapped",
            ));
        }
        let src = FileWindow::new(file, start, len)
            .map_err(|e| at(&display)(Error::io("opening a window of", e)))?;
        Self::open_source(py, Box::new(src), display, None, defer)
    }

    fn record(&self, name: &str) -> PyResult<&crate::container::reader::Record> {
        self.archive.require(name).map_err(at(&self.file))
    }
}

#[pymethods]
impl PyArchive {
    /// Opens a checkpoint by path; `mmap=True` maps it copy-on-write. `defer_data=True`
    /// leaves the local headers of `data/` records of an unmapped file unread until a
    /// record's data is first needed (see `Archive::open_deferring_data`).
    /// `window=(start, length)`: the archive is those bytes of the file (read, never
    /// mapped), and every offset this archive reports is relative to `start`.
    #[staticmethod]
    #[pyo3(signature = (path, mmap=false, defer_data=false, shared=false, window=None))]
    fn open_path(
        py: Python<'_>,
        path: PathBuf,
        mmap: bool,
        defer_data: bool,
        shared: bool,
        window: Option<(u64, u64)>,
    ) -> PyResult<Self> {
        let display = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(mmap && shared)
            .open(&path)
            .map_err(|e| at(&display)(Error::io("opening", e)))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(at(&display)(Error::io(
                "opening",
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            )));
        }
        Self::open_window_or_file(py, file, mmap, shared, defer_data, window, display)
    }

    /// Opens a checkpoint from a file descriptor the caller keeps: this call reads
    /// through a duplicate of its own and never closes `fd`.
    #[staticmethod]
    #[pyo3(signature = (fd, display, mmap=false, defer_data=false, window=None))]
    fn open_fd(
        py: Python<'_>,
        fd: i32,
        display: String,
        mmap: bool,
        defer_data: bool,
        window: Option<(u64, u64)>,
    ) -> PyResult<Self> {
        // F_DUPFD_CLOEXEC fails cleanly (EBADF) for a descriptor that is not open.
        // SAFETY: fcntl only reads its integer arguments.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            let err = std::io::Error::last_os_error();
            return Err(at(&display)(Error::io(
                "duplicating the file descriptor",
                err,
            )));
        }
        // SAFETY: `own` was just returned by fcntl: a new descriptor nothing else owns;
        // File takes ownership and closes it exactly once.
        let file = unsafe { File::from_raw_fd(own) };
        Self::open_window_or_file(py, file, mmap, false, defer_data, window, display)
    }

    /// Opens a checkpoint held in memory (bytes, bytearray, memoryview).
    #[staticmethod]
    fn open_buffer(py: Python<'_>, data: &Bound<'_, PyAny>, display: String) -> PyResult<Self> {
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "checkpoint buffer must be C-contiguous",
            ));
        }
        Self::open_source(
            py,
            Box::new(MemorySource(PyBufferBytes(buf))),
            display,
            None,
            false,
        )
    }

    /// The file (or a description of the buffer) this archive was opened from.
    #[getter]
    fn file(&self) -> &str {
        &self.file
    }

    /// The archive's top folder.
    #[getter]
    fn prefix(&self) -> &str {
        self.archive.prefix()
    }

    /// Total size of the underlying file or buffer, in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.archive.source().len()
    }

    /// The copy-on-write mapping of the whole file (`mmap=True` only).
    #[getter]
    fn mapping(&self, py: Python<'_>) -> Option<Py<MappedBuffer>> {
        self.mapping.as_ref().map(|m| m.clone_ref(py))
    }

    /// Record names inside the top folder, in archive order.
    fn names(&self) -> Vec<String> {
        self.archive.names().into_iter().map(String::from).collect()
    }

    fn has(&self, name: &str) -> bool {
        self.archive.get(name).is_some()
    }

    /// `(data_offset, size, crc32, compressed)` of a record.
    fn info(&self, name: &str) -> PyResult<(u64, u64, u32, bool)> {
        let r = self.record(name)?;
        Ok((
            self.archive.offset_of(r).map_err(at(&self.file))?,
            r.size,
            r.crc32,
            r.compression == Compression::Deflated,
        ))
    }

    /// A whole record's bytes; its CRC32 is checked unless `verify=False`.
    #[pyo3(signature = (name, verify=true))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        verify: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let rec = self.record(name)?;
        let data = py
            .allow_threads(|| self.archive.read(rec, verify))
            .map_err(at(&self.file))?;
        Ok(PyBytes::new(py, &data))
    }

    /// A record copied (or decompressed) into a new aligned buffer, byte-swapped by
    /// `swap`-byte elements when `swap > 1`.
    #[pyo3(signature = (name, swap=0, verify=false))]
    fn read_buffer(
        &self,
        py: Python<'_>,
        name: &str,
        swap: usize,
        verify: bool,
    ) -> PyResult<OwnedBuffer> {
        let rec = self.record(name)?;
        let len = usize::try_from(rec.size).map_err(|_| {
            at(&self.file)(Error::bad_record(&rec.name, "too large for this machine"))
        })?;
        let mut buf = AlignedBuffer::zeroed(len).ok_or_else(|| {
            pyo3::exceptions::PyMemoryError::new_err(format!(
                "{}: cannot allocate {len} bytes for '{}'",
                self.file, rec.name
            ))
        })?;
        py.allow_threads(|| {
            self.archive.read_many_into(
                vec![ReadJob {
                    record: rec,
                    dst: buf.as_mut_slice(),
                    swap,
                }],
                num_threads(),
                verify,
            )
        })
        .map_err(at(&self.file))?;
        Ok(OwnedBuffer::new(buf))
    }

    /// Reads records into caller memory: `jobs` is a list of `(record_name, buffer,
    /// swap_element_size)`, each buffer a writable, C-contiguous object of the
    /// buffer protocol (a numpy array, a bytearray) exactly the record's size. The
    /// buffers stay exported, so their memory can be neither freed nor resized
    /// while the reads run with the GIL released.
    #[pyo3(signature = (jobs, verify=false))]
    fn read_into(
        &self,
        py: Python<'_>,
        jobs: Vec<(String, PyBuffer<u8>, usize)>,
        verify: bool,
    ) -> PyResult<()> {
        let mut resolved = Vec::with_capacity(jobs.len());
        for (name, buf, swap) in &jobs {
            let rec = self.record(name)?;
            if buf.readonly() || !buf.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "read_into needs a writable C-contiguous buffer for '{name}'"
                )));
            }
            if buf.len_bytes() as u64 != rec.size {
                return Err(at(&self.file)(Error::bad_record(
                    &rec.name,
                    format!(
                        "holds {} bytes but the destination has {}",
                        rec.size,
                        buf.len_bytes()
                    ),
                )));
            }
            resolved.push((rec, buf.buf_ptr() as usize, buf.len_bytes(), *swap));
        }
        for (i, a) in resolved.iter().enumerate() {
            let overlaps = resolved[i + 1..]
                .iter()
                .any(|b| a.2 > 0 && b.2 > 0 && a.1 < b.1 + b.2 && b.1 < a.1 + a.2);
            if overlaps {
                return Err(PyValueError::new_err(
                    "read_into destinations must not overlap",
                ));
            }
        }
        let jobs_ref: Vec<ReadJob<'_>> = resolved
            .into_iter()
            .map(|(record, addr, nbytes, swap)| ReadJob {
                record,
                dst: if nbytes == 0 {
                    &mut []
                } else {
                    // SAFETY: addr/nbytes describe a writable, C-contiguous buffer that
                    // `jobs` keeps exported until this call returns, so the exporter can
                    // neither free nor move it; the destinations were checked not to
                    // overlap, so each slice is the only one over its bytes.
                    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, nbytes) }
                },
                swap,
            })
            .collect();
        let result =
            py.allow_threads(|| self.archive.read_many_into(jobs_ref, num_threads(), verify));
        drop(jobs);
        result.map_err(at(&self.file))
    }

    /// Drops the process's mapped pages of a record once its data has been copied
    /// elsewhere (a GPU): resident memory then never holds the whole checkpoint.
    /// Private API: nothing may still read modified data from the record's views.
    fn release(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let rec = self.record(name)?;
        if let Some(mapping) = &self.mapping {
            let offset = self.archive.offset_of(rec).map_err(at(&self.file))?;
            let map = &mapping.bind(py).get().map;
            // SAFETY: see MappedFile::discard; the loader calls this only after the
            // record's bytes were copied to a device and its CPU view dropped.
            unsafe { map.discard(offset as usize, rec.size as usize) };
        }
        Ok(())
    }

    /// Checks the CRC32 of the named records (all when `None`) on several threads.
    /// Returns `(record, problem)` for every failure instead of stopping at the first.
    #[pyo3(signature = (names=None))]
    fn verify(
        &self,
        py: Python<'_>,
        names: Option<Vec<String>>,
    ) -> PyResult<Vec<(String, String)>> {
        let records: Vec<_> = match names {
            Some(ns) => ns.iter().map(|n| self.record(n)).collect::<PyResult<_>>()?,
            None => self.archive.records().iter().collect(),
        };
        // As for reads: a few megabytes are checked faster on this thread alone.
        let total: u64 = records.iter().map(|r| r.size).sum();
        let threads = num_threads().max(1).min(
            usize::try_from(total >> 22)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
        );
        let failures = py.allow_threads(|| {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let out = std::sync::Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(rec) = records.get(i) else { break };
                        if let Err(e) = self.archive.verify_record(rec) {
                            out.lock().unwrap_or_else(|p| p.into_inner()).push((
                                i,
                                rec.name.clone(),
                                e.to_string(),
                            ));
                        }
                    });
                }
            });
            let mut v = out.into_inner().unwrap_or_else(|p| p.into_inner());
            v.sort();
            v.into_iter().map(|(_, n, e)| (n, e)).collect::<Vec<_>>()
        });
        Ok(failures)
    }
}
