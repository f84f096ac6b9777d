//! Python objects that export native memory through the buffer protocol, so
//! `torch.frombuffer` / `numpy.frombuffer` view it without a copy. Each keeps its
//! memory alive for as long as any view (and so any tensor) exists.

use std::ffi::c_int;
use std::sync::Arc;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::storage::{AlignedBuffer, MappedFile};

/// Fills `view` for `len` writable bytes at `ptr`, owned by `owner`.
///
/// # Safety
/// `view` must be the pointer CPython passed to `bf_getbuffer`, and `ptr` must stay
/// valid for `len` bytes for as long as `owner` is alive (the view holds a reference).
unsafe fn fill_view(
    py: Python<'_>,
    owner: *mut ffi::PyObject,
    view: *mut ffi::Py_buffer,
    ptr: *mut u8,
    len: usize,
    flags: c_int,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("view is null"));
    }
    // SAFETY: the caller guarantees view/owner come from bf_getbuffer and ptr/len describe
    // memory owned by owner; PyBuffer_FillInfo takes a new reference to owner.
    let rc = unsafe { ffi::PyBuffer_FillInfo(view, owner, ptr.cast(), len as isize, 0, flags) };
    if rc != 0 {
        return Err(PyErr::fetch(py));
    }
    Ok(())
}

/// A private copy-on-write mapping of a whole checkpoint file.
#[pyclass(module = "fastserial._fastserial", frozen)]
pub struct MappedBuffer {
    pub(crate) map: Arc<MappedFile>,
    ptr: SendPtr,
}

/// A raw pointer that is only dereferenced by the memory's users (torch, numpy).
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the pointer is never dereferenced by Rust after construction; it is handed to
// Python buffer consumers while the owning Arc keeps the memory alive.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl MappedBuffer {
    /// The mapping's first byte, and the mapping (shared with every view of it).
    pub(crate) fn base_and_map(&self) -> (usize, Arc<MappedFile>) {
        (self.ptr.0 as usize, self.map.clone())
    }

    pub fn new(mut map: MappedFile) -> Self {
        let ptr = SendPtr(map.as_mut_ptr());
        MappedBuffer {
            map: Arc::new(map),
            ptr,
        }
    }
}

#[pymethods]
impl MappedBuffer {
    fn __len__(&self) -> usize {
        self.map.len()
    }

    /// # Safety
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = (slf.get().ptr.0, slf.get().map.len());
        // SAFETY: the mapping lives in an Arc owned by slf, which the view references.
        unsafe { fill_view(slf.py(), slf.as_ptr(), view, ptr, len, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// An owned, 64-byte aligned buffer (a decompressed or eagerly read record).
#[pyclass(module = "fastserial._fastserial", frozen)]
pub struct OwnedBuffer {
    buf: AlignedBuffer,
    ptr: SendPtr,
}

impl OwnedBuffer {
    pub fn new(mut buf: AlignedBuffer) -> Self {
        let ptr = SendPtr(buf.as_mut_ptr());
        OwnedBuffer { buf, ptr }
    }
}

#[pymethods]
impl OwnedBuffer {
    fn __len__(&self) -> usize {
        self.buf.len()
    }

    /// # Safety
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = (slf.get().ptr.0, slf.get().buf.len());
        // SAFETY: the allocation is owned by slf and never reallocated; the view holds a
        // reference to slf, so it outlives every consumer.
        unsafe { fill_view(slf.py(), slf.as_ptr(), view, ptr, len, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
