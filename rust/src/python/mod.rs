//! The PyO3 binding: the only module that touches Python. It exposes the container
//! reader and writer, the zero-copy buffers, the pickle scanner and a few kernels.

mod buffers;
mod builder;
mod dlpack;
mod errors;
mod factory;
mod pickling;
mod reader;
mod unpickle;
mod writer;

use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::endian::byteswap_in_place;

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// I/O threads used by bulk reads (default: the cores available).
pub(crate) fn num_threads() -> usize {
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
}

#[pyfunction]
fn get_num_threads() -> usize {
    num_threads()
}

#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(
            "the number of threads must be at least 1",
        ));
    }
    NUM_THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// Scans a pickle without running it: its globals, persistent-id use and protocol.
#[pyfunction]
#[pyo3(signature = (data, file="<pickle>"))]
fn scan_pickle<'py>(py: Python<'py>, data: &[u8], file: &str) -> PyResult<Bound<'py, PyDict>> {
    let s = crate::pickle::scan(data).map_err(errors::at(file))?;
    let d = PyDict::new(py);
    d.set_item("globals", s.globals)?;
    d.set_item("persistent_ids", s.persistent_ids)?;
    d.set_item("persistent_id_reused", s.persistent_id_reused)?;
    d.set_item("builds", s.builds)?;
    d.set_item("untyped_mutations", s.untyped_mutations)?;
    d.set_item("protocol", s.protocol)?;
    d.set_item("unsafe_opcodes", s.unsafe_opcodes)?;
    d.set_item("end", s.end)?;
    d.set_item("memo_read", pyo3::types::PyBytes::new(py, &s.memo_read))?;
    Ok(d)
}

/// Swaps the byte order of a writable, C-contiguous buffer in place, by
/// `elem_size`-byte elements (the buffer stays exported during the call, so its
/// memory cannot move).
#[pyfunction]
fn byteswap(py: Python<'_>, data: pyo3::buffer::PyBuffer<u8>, elem_size: usize) -> PyResult<()> {
    if data.readonly() || !data.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "byteswap needs a writable C-contiguous buffer",
        ));
    }
    let (addr, len) = (data.buf_ptr() as usize, data.len_bytes());
    if len == 0 || elem_size <= 1 {
        return Ok(());
    }
    // SAFETY: `data` keeps the exporter's writable memory alive and in place during
    // the call, and nothing else runs on it while the GIL is released here.
    let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    py.allow_threads(|| byteswap_in_place(buf, elem_size))
        .map_err(PyValueError::new_err)
}

/// CRC32 of a buffer (SIMD, GIL released).
#[pyfunction]
fn crc32(py: Python<'_>, data: pyo3::buffer::PyBuffer<u8>) -> PyResult<u32> {
    if !data.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer must be C-contiguous"));
    }
    let (addr, len) = (data.buf_ptr() as usize, data.len_bytes());
    // SAFETY: `data` keeps the exporter's memory alive and in place during the call.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    Ok(py.allow_threads(|| crc32fast::hash(bytes)))
}

#[pymodule]
fn _fastserial(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add(
        "CheckpointError",
        m.py().get_type::<errors::CheckpointError>(),
    )?;
    m.add("TEMP_MARKER", crate::atomic::TEMP_MARKER)?;
    m.add_class::<reader::PyArchive>()?;
    m.add_class::<writer::PyArchiveWriter>()?;
    m.add_class::<writer::PyBlobFrame>()?;
    m.add_class::<buffers::MappedBuffer>()?;
    m.add_class::<buffers::OwnedBuffer>()?;
    m.add_class::<factory::TensorFactory>()?;
    m.add_class::<factory::PendingStorage>()?;
    m.add_class::<pickling::SaveHelper>()?;
    m.add_class::<pickling::StorageRef>()?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(scan_pickle, m)?)?;
    m.add_function(wrap_pyfunction!(byteswap, m)?)?;
    m.add_function(wrap_pyfunction!(crc32, m)?)?;
    m.add_function(wrap_pyfunction!(dlpack::dlpack_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(dlpack::packed_blocks_alive, m)?)?;
    Ok(())
}
