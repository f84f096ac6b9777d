//! `ArchiveWriter` for Python: streams records to a path (atomically replaced, GIL
//! released during the writes) or to any object with a `write` method.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::at;
use crate::atomic::AtomicFile;
use crate::container::writer::ArchiveWriter;
use crate::error::{Error, Result};

/// Writes into a Python file-like object, in bounded chunks.
struct PySink(Py<PyAny>);

const PY_CHUNK: usize = 16 << 20;

impl Write for PySink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(PY_CHUNK);
        Python::with_gil(|py| {
            let written = self
                .0
                .call_method1(py, "write", (PyBytes::new(py, &buf[..n]),))
                // Carried inside the io::Error, so `py_error` re-raises the very object.
                .map_err(std::io::Error::other)?;
            // Raw streams may write less than asked (None means "would block").
            match written.extract::<Option<usize>>(py) {
                Ok(Some(k)) if k <= n => Ok(k),
                Ok(None) => Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "write returned None",
                )),
                _ => Ok(n),
            }
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The exception a Python file's `write()` raised, when `err` carries one: it reaches
/// the caller unchanged (same type, same object), as from `torch.save`.
fn take_py_error(err: Error) -> std::result::Result<PyErr, Error> {
    match err {
        Error::Io { context, source } if source.get_ref().is_some_and(|e| e.is::<PyErr>()) => {
            match source.into_inner().map(|inner| inner.downcast::<PyErr>()) {
                Some(Ok(e)) => Ok(*e),
                Some(Err(other)) => Err(Error::io(context, std::io::Error::other(other))),
                None => Err(Error::Usage(context)),
            }
        }
        other => Err(other),
    }
}

/// `at(file)`, except that an exception raised by a Python file passes through.
fn py_error(file: &str) -> impl Fn(Error) -> PyErr + '_ {
    move |e| take_py_error(e).unwrap_or_else(|e| at(file)(e))
}

const BUFFER: usize = 1 << 20;

/// A file that, for durable saves, asks the kernel to start writing each 32 MiB to
/// disk as soon as it is written (`sync_file_range`), so the final fsync waits only
/// for the tail instead of the whole checkpoint.
struct WritebackFile {
    file: File,
    early_writeback: bool,
    written: u64,
    flushed_to: u64,
}

const WRITEBACK_STEP: u64 = 32 << 20;

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.early_writeback && self.written - self.flushed_to >= WRITEBACK_STEP {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a descriptor we own; the range lies within what
            // we have written. Failure only loses the optimisation (fsync still runs).
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushed_to as libc::off64_t,
                    (self.written - self.flushed_to) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.flushed_to = self.written;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

enum Target {
    File {
        writer: ArchiveWriter<BufWriter<WritebackFile>>,
        atomic: Option<AtomicFile>,
    },
    Python(ArchiveWriter<BufWriter<PySink>>),
}

#[pyclass(name = "ArchiveWriter", module = "fastserial._fastserial")]
pub struct PyArchiveWriter {
    target: Option<Target>,
    file: String,
}

impl PyArchiveWriter {
    fn target(&mut self) -> PyResult<&mut Target> {
        self.target
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the archive writer is already finished"))
    }

    fn run<T>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut dyn RecordSink) -> Result<T> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        let file = self.file.clone();
        match self.target()? {
            Target::File { writer, .. } => py.allow_threads(|| f(writer)).map_err(at(&file)),
            Target::Python(writer) => f(writer).map_err(py_error(&file)),
        }
    }
}

impl PyArchiveWriter {
    /// Appends one record per `(name, address, nbytes)`.
    ///
    /// # Safety
    /// Each address must point to `nbytes` readable bytes that stay alive, and are not
    /// written, until this call returns.
    pub(crate) unsafe fn write_spans(
        &mut self,
        py: Python<'_>,
        spans: Vec<(String, usize, usize)>,
    ) -> PyResult<()> {
        self.run(py, move |w| {
            for (name, addr, n) in &spans {
                let data: &[u8] = if *n == 0 {
                    &[]
                } else {
                    // SAFETY: the caller of write_spans guarantees the span (above).
                    unsafe { std::slice::from_raw_parts(*addr as *const u8, *n) }
                };
                w.record(name, data)?;
            }
            Ok(())
        })
    }
}

/// The operations shared by both targets.
trait RecordSink {
    fn record(&mut self, name: &str, data: &[u8]) -> Result<()>;
}

impl<W: Write> RecordSink for ArchiveWriter<W> {
    fn record(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.write_record(name, data)
    }
}

#[pymethods]
impl PyArchiveWriter {
    /// `target` is a path (atomically replaced on `finish`) or a file-like object.
    /// `atomic=False` writes a path in place (for devices and pipes).
    #[new]
    #[pyo3(signature = (target, prefix, atomic=true, durable=true))]
    fn new(target: &Bound<'_, PyAny>, prefix: &str, atomic: bool, durable: bool) -> PyResult<Self> {
        if let Ok(path) = target.extract::<PathBuf>() {
            let display = path.display().to_string();
            let (file, atomic_file) = if atomic {
                let mut a = AtomicFile::create(&path).map_err(|e| {
                    at(&display)(Error::io(
                        "creating a temporary file beside the checkpoint",
                        e,
                    ))
                })?;
                let f = a
                    .file()
                    .try_clone()
                    .map_err(|e| at(&display)(Error::io("opening the temporary file", e)))?;
                (f, Some(a))
            } else {
                let f = File::create(&path).map_err(|e| at(&display)(Error::io("creating", e)))?;
                (f, None)
            };
            let file = WritebackFile {
                file,
                early_writeback: durable,
                written: 0,
                flushed_to: 0,
            };
            let writer = ArchiveWriter::new(BufWriter::with_capacity(BUFFER, file), prefix);
            return Ok(PyArchiveWriter {
                target: Some(Target::File {
                    writer,
                    atomic: atomic_file,
                }),
                file: display,
            });
        }
        if !target.hasattr("write")? {
            return Err(PyTypeError::new_err(format!(
                "expected a path or a file-like object with a write() method, got {}",
                target.get_type().name()?
            )));
        }
        let display = format!("<{}>", target.get_type().name()?);
        let sink = BufWriter::with_capacity(BUFFER, PySink(target.clone().unbind()));
        Ok(PyArchiveWriter {
            target: Some(Target::Python(ArchiveWriter::new(sink, prefix))),
            file: display,
        })
    }

    /// Appends one record from any contiguous buffer (bytes, memoryview, ...).
    fn write_record(
        &mut self,
        py: Python<'_>,
        name: &str,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("record data must be C-contiguous"));
        }
        let addr = buf.buf_ptr() as usize;
        let len = buf.len_bytes();
        self.run(py, move |w| {
            // SAFETY: `buf` keeps the exporter's memory alive and in place until it is
            // dropped after this call returns.
            let data = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
            w.record(name, data)
        })
    }

    /// Appends storage records from buffers: `items` is `[(name, buffer)]`, each a
    /// C-contiguous object of the buffer protocol (a numpy array, bytes, ...). The
    /// buffers stay exported until the records are written, so their memory can be
    /// neither freed nor resized meanwhile.
    fn write_storages(
        &mut self,
        py: Python<'_>,
        items: Vec<(String, PyBuffer<u8>)>,
    ) -> PyResult<()> {
        let mut spans = Vec::with_capacity(items.len());
        for (name, buf) in &items {
            if !buf.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "storage data for '{name}' must be C-contiguous"
                )));
            }
            spans.push((name.clone(), buf.buf_ptr() as usize, buf.len_bytes()));
        }
        // SAFETY: every span is the memory of a buffer that `items` keeps exported
        // until this call returns.
        let result = unsafe { self.write_spans(py, spans) };
        drop(items);
        result
    }

    /// The 40-digit serialization id for the records written so far.
    fn serialization_id(&mut self) -> PyResult<String> {
        Ok(match self.target()? {
            Target::File { writer, .. } => writer.serialization_id(),
            Target::Python(writer) => writer.serialization_id(),
        })
    }

    /// Writes the directory; for paths, fsyncs (when `fsync`) and renames into place.
    #[pyo3(signature = (fsync=true))]
    fn finish(&mut self, py: Python<'_>, fsync: bool) -> PyResult<()> {
        let target = self
            .target
            .take()
            .ok_or_else(|| PyValueError::new_err("the archive writer is already finished"))?;
        let file = self.file.clone();
        match target {
            Target::File { writer, atomic } => py
                .allow_threads(move || -> Result<()> {
                    let buffered = writer.finish()?;
                    let f = buffered
                        .into_inner()
                        .map_err(|e| Error::io("flushing the checkpoint", e.into_error()))?
                        .file;
                    match atomic {
                        Some(a) => {
                            drop(f);
                            a.commit(fsync).map_err(|e| {
                                Error::io("moving the finished checkpoint into place", e)
                            })
                        }
                        None if fsync => f
                            .sync_all()
                            .map_err(|e| Error::io("syncing the checkpoint", e)),
                        None => Ok(()),
                    }
                })
                .map_err(at(&file)),
            Target::Python(writer) => {
                let buffered = writer.finish().map_err(py_error(&file))?;
                let sink = buffered.into_inner().map_err(|e| {
                    py_error(&file)(Error::io("flushing the checkpoint", e.into_error()))
                })?;
                // As torch.save: the bytes leave the file object's own buffer, so
                // whoever opens the file by name sees the whole checkpoint.
                let target = sink.0.bind(py);
                if target.hasattr(intern!(py, "flush"))? {
                    target.call_method0(intern!(py, "flush"))?;
                }
                Ok(())
            }
        }
    }

    /// Abandons the archive: a path's temporary file is removed, the old checkpoint
    /// is left untouched.
    fn abort(&mut self) {
        self.target = None;
    }
}

/// The zip around one record whose data the caller writes itself (a tensor of a
/// distributed checkpoint's shard file, written from its memory at its offset):
/// `head` (the records `before`, then the local header of `name`), the `size` data
/// bytes, then `tail(crc)` (the data descriptor, the records `after`,
/// `.data/serialization_id` and the directory). Together they are byte for byte the
/// archive `ArchiveWriter` writes for the same records.
#[pyclass(name = "BlobFrame", module = "fastserial._fastserial", frozen)]
pub struct PyBlobFrame {
    head: Py<PyBytes>,
    /// The writer just after the local header of `name` (its output is `head`).
    writer: crate::container::writer::ArchiveWriter<Vec<u8>>,
    record: crate::container::writer::ExternalRecord,
    after: Vec<(String, Vec<u8>)>,
    size: u64,
    tail_len: usize,
}

impl PyBlobFrame {
    fn tail_bytes(&self, crc: u32) -> crate::error::Result<Vec<u8>> {
        let head_len = (self.writer.position() - self.size) as usize;
        let mut w = self.writer.clone();
        w.end_external_record(self.record.clone(), crc)?;
        for (name, data) in &self.after {
            w.write_record(name, data)?;
        }
        let id = w.serialization_id();
        w.write_record(".data/serialization_id", id.as_bytes())?;
        let mut out = w.finish()?;
        Ok(out.split_off(head_len))
    }
}

#[pymethods]
impl PyBlobFrame {
    #[new]
    #[pyo3(signature = (prefix, before, name, size, after))]
    fn new(
        py: Python<'_>,
        prefix: &str,
        before: Vec<(String, Vec<u8>)>,
        name: &str,
        size: u64,
        after: Vec<(String, Vec<u8>)>,
    ) -> PyResult<Self> {
        let display = "<blob frame>";
        let mut writer = crate::container::writer::ArchiveWriter::new(Vec::new(), prefix);
        for (n, d) in &before {
            writer.write_record(n, d).map_err(at(display))?;
        }
        let record = writer
            .begin_external_record(name, size)
            .map_err(at(display))?;
        let head = PyBytes::new(py, &writer.clone().into_inner()).unbind();
        let mut frame = PyBlobFrame {
            head,
            writer,
            record,
            after,
            size,
            tail_len: 0,
        };
        frame.tail_len = frame.tail_bytes(0).map_err(at(display))?.len();
        Ok(frame)
    }

    /// Everything before the data.
    #[getter]
    fn head(&self, py: Python<'_>) -> Py<PyBytes> {
        self.head.clone_ref(py)
    }

    /// The whole archive's length: head, data and tail.
    #[getter]
    fn length(&self, py: Python<'_>) -> u64 {
        self.head.bind(py).as_bytes().len() as u64 + self.size + self.tail_len as u64
    }

    /// Everything after the data, once its CRC32 is known (a fresh serialization id
    /// each call).
    fn tail<'py>(&self, py: Python<'py>, crc: u32) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.tail_bytes(crc).map_err(at("<blob frame>"))?;
        Ok(PyBytes::new(py, &out))
    }
}
