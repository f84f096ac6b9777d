//! `TensorFactory`: the per-tensor hot path of a load, natively.
//!
//! The Python loader (`serialization._ZipLoader`) owns the semantics; this object
//! runs its common case without Python bytecode: `persistent_load` for CPU storages
//! returns a `PendingStorage`, and `rebuild_tensor_v2/v3` on a pending storage
//! validates the view, allocates the tensor at its final size (or views the mapped
//! file), and queues its bytes. `finish` reads every queued record in one call, on
//! several threads, with the GIL released. Anything unusual is handed back to the
//! Python callables given at construction, so behaviour has a single definition.

use std::collections::HashMap;

use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

use super::errors::{at, CheckpointError};
use super::num_threads;
use super::reader::PyArchive;
use crate::container::reader::{Compression, ReadJob};

/// A storage the pickle named, whose memory is created with its first tensor.
#[pyclass(module = "fastserial._fastserial")]
pub struct PendingStorage {
    record: usize,
    dtype: Py<PyAny>,
    nbytes: usize,
    swap: usize,
    /// The untyped storage, once some tensor created it.
    storage: Option<Py<PyAny>>,
    /// The first tensor built over it (its storage is fetched only if needed again).
    first: Option<Py<PyAny>>,
}

#[pymethods]
impl PendingStorage {
    #[getter]
    fn dtype(&self, py: Python<'_>) -> Py<PyAny> {
        self.dtype.clone_ref(py)
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }
    /// The untyped storage, creating it (and queueing its read) when no tensor has.
    fn untyped(slf: &Bound<'_, Self>, factory: &Bound<'_, TensorFactory>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        factory.borrow_mut().storage_of(py, slf)
    }
}

struct Torch {
    empty_strided: Py<PyAny>,
    empty: Py<PyAny>,
    untyped_storage: Py<PyAny>,
    frombuffer: Py<PyAny>,
    set_tensor_metadata: Py<PyAny>,
}

#[pyclass(module = "fastserial._fastserial")]
pub struct TensorFactory {
    archive: Py<PyArchive>,
    /// `data/KEY` records by key: (record index, size).
    records: HashMap<String, (usize, u64)>,
    slots: HashMap<String, Py<PyAny>>,
    jobs: Vec<(usize, usize, usize, usize)>,
    keepalive: Vec<Py<PyAny>>,
    produced: usize,
    consumed: usize,
    swap: bool,
    /// Every location lands on the CPU (map_location='cpu'); else only 'cpu' does.
    all_cpu: bool,
    verify: bool,
    mapping: Option<Py<PyAny>>,
    untyped_cls: Py<PyAny>,
    uint8: Py<PyAny>,
    /// dtype -> (itemsize, swap element size)
    sizes: Py<PyDict>,
    torch: Torch,
    /// Python fallbacks: persistent_load(saved_id), rebuild_v2(*args), rebuild_v3(*args),
    /// mapped_storage(record_name, nbytes, swap) -> UntypedStorage.
    py_persistent_load: Py<PyAny>,
    py_rebuild_v2: Py<PyAny>,
    py_rebuild_v3: Py<PyAny>,
    py_mapped_storage: Py<PyAny>,
}

fn int_list(obj: &Bound<'_, PyAny>) -> Option<Vec<i64>> {
    let t = obj.downcast::<PyTuple>().ok()?;
    let mut v = Vec::with_capacity(t.len());
    for item in t.iter() {
        v.push(item.extract::<i64>().ok()?);
    }
    Some(v)
}

/// Calls a Python fallback with `args` and, when given, the optional `metadata`.
fn call_with(
    py: Python<'_>,
    f: &Py<PyAny>,
    args: &[&Bound<'_, PyAny>],
    metadata: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let items: Vec<&Bound<'_, PyAny>> = args.iter().copied().chain(metadata).collect();
    f.call1(py, PyTuple::new(py, items)?)
}

/// True when (size, stride) covers exactly `numel` elements without gaps or overlap.
fn is_dense(size: &[i64], stride: &[i64], numel: i64) -> bool {
    if size.len() == 1 {
        return size[0] == numel && (stride[0] == 1 || numel <= 1);
    }
    let mut dims: Vec<(i64, i64)> = size
        .iter()
        .copied()
        .zip(stride.iter().copied())
        .filter(|d| d.0 != 1)
        .collect();
    dims.sort_by_key(|d| d.1);
    let mut expected = 1i64;
    for (n, s) in dims {
        if s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    expected == numel
}

impl TensorFactory {
    fn archive<'a>(&'a self, _py: Python<'a>) -> &'a PyArchive {
        self.archive.get()
    }

    fn record_name(&self, py: Python<'_>, record: usize) -> String {
        self.archive(py).archive.records()[record].name.clone()
    }

    /// The untyped storage behind a pending storage, creating it when needed.
    fn storage_of(
        &mut self,
        py: Python<'_>,
        pending: &Bound<'_, PendingStorage>,
    ) -> PyResult<Py<PyAny>> {
        let mut p = pending.borrow_mut();
        if let Some(s) = &p.storage {
            return Ok(s.clone_ref(py));
        }
        if let Some(first) = &p.first {
            let s = first
                .bind(py)
                .call_method0(intern!(py, "untyped_storage"))?
                .unbind();
            p.storage = Some(s.clone_ref(py));
            return Ok(s);
        }
        let s = if self.mapping.is_some() {
            let name = self.record_name(py, p.record);
            let rel = name
                .split_once('/')
                .map(|x| x.1)
                .unwrap_or(&name)
                .to_string();
            self.py_mapped_storage.call1(py, (rel, p.nbytes, p.swap))?
        } else {
            let s = self.torch.untyped_storage.call1(py, (p.nbytes,))?;
            if p.nbytes > 0 {
                let ptr: usize = s.call_method0(py, intern!(py, "data_ptr"))?.extract(py)?;
                self.jobs.push((p.record, ptr, p.nbytes, p.swap));
            }
            s
        };
        self.keepalive.push(s.clone_ref(py));
        p.storage = Some(s.clone_ref(py));
        Ok(s)
    }

    fn sizes_of(&self, py: Python<'_>, dtype: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
        match self.sizes.bind(py).get_item(dtype)? {
            Some(v) => v.extract(),
            None => Ok((1, 1)),
        }
    }

    fn view_error(&self, py: Python<'_>, record: usize, msg: String) -> PyErr {
        let name = self.record_name(py, record);
        CheckpointError::new_err(format!("{}: record '{name}': {msg}", self.archive(py).file))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        py: Python<'_>,
        pending: &Bound<'_, PendingStorage>,
        dtype: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        size_obj: &Bound<'_, PyAny>,
        stride_obj: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        self.consumed += 1;
        let (record, nbytes, swap_pending, has_storage) = {
            let p = pending.borrow();
            (
                p.record,
                p.nbytes,
                p.swap,
                p.storage.is_some() || p.first.is_some(),
            )
        };
        let (itemsize, swap_size) = self.sizes_of(py, dtype)?;
        let (Some(size), Some(stride), Ok(off)) = (
            int_list(size_obj),
            int_list(stride_obj),
            offset.extract::<i64>(),
        ) else {
            return Err(self.view_error(
                py,
                record,
                format!(
                    "invalid tensor view (offset {offset}, size {size_obj}, stride {stride_obj})"
                ),
            ));
        };
        if size.len() != stride.len() || off < 0 || size.iter().chain(stride.iter()).any(|&v| v < 0)
        {
            return Err(self.view_error(
                py,
                record,
                format!("invalid tensor view (offset {off}, size {size:?}, stride {stride:?})"),
            ));
        }
        if !size.contains(&0) {
            let extent = size.iter().zip(&stride).try_fold(off, |acc, (&n, &s)| {
                acc.checked_add((n - 1).checked_mul(s)?)
            });
            let fits = extent
                .and_then(|e| e.checked_add(1))
                .and_then(|e| e.checked_mul(itemsize as i64))
                .is_some_and(|end| end as u64 <= nbytes as u64);
            if !fits {
                return Err(self.view_error(py, record, format!(
                    "tensor view (offset {off}, size {size:?}, stride {stride:?}) reaches past the end of its {nbytes}-byte storage"
                )));
            }
        }
        // Byte-swap by the tensor's dtype, also over an untyped (uint8) storage.
        let swap = if self.swap { swap_size } else { 0 };
        let _ = swap_pending;
        let numel = (nbytes / itemsize.max(1)) as i64;
        let dense = off == 0
            && numel as usize * itemsize == nbytes
            && nbytes > 0
            && is_dense(&size, &stride, numel);
        if !has_storage && dense {
            let kwargs = PyDict::new(py);
            kwargs.set_item(intern!(py, "dtype"), dtype)?;
            if let Some(mapping) = &self.mapping {
                let archive = self.archive(py);
                let rec = &archive.archive.records()[record];
                // Zero-copy only for records on torch's 64-byte alignment: anything else
                // (archives re-zipped without padding) is copied to aligned memory.
                let plain = rec.compression == Compression::Stored
                    && swap <= 1
                    && rec.data_offset % 64 == 0;
                if plain {
                    kwargs.set_item(intern!(py, "count"), numel)?;
                    kwargs.set_item(intern!(py, "offset"), rec.data_offset)?;
                    let t =
                        self.torch
                            .frombuffer
                            .call(py, (mapping.clone_ref(py),), Some(&kwargs))?;
                    if size.len() != 1 || size[0] != numel || stride[0] != 1 {
                        t.call_method1(py, intern!(py, "as_strided_"), (size_obj, stride_obj, 0))?;
                    }
                    pending.borrow_mut().first = Some(t.clone_ref(py));
                    return Ok(t);
                }
            } else {
                let t = self
                    .torch
                    .empty_strided
                    .call(py, (size_obj, stride_obj), Some(&kwargs))?;
                let ptr: usize = t.call_method0(py, intern!(py, "data_ptr"))?.extract(py)?;
                self.jobs.push((record, ptr, nbytes, swap));
                self.keepalive.push(t.clone_ref(py));
                pending.borrow_mut().first = Some(t.clone_ref(py));
                return Ok(t);
            }
        }
        if !has_storage {
            // Fix the swap width to this tensor's dtype before the storage is created.
            pending.borrow_mut().swap = swap;
        }
        let storage = self.storage_of(py, pending)?;
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "dtype"), dtype)?;
        let t = self.torch.empty.call(py, ((0,),), Some(&kwargs))?;
        t.call_method1(
            py,
            intern!(py, "set_"),
            (storage, offset, size_obj, stride_obj),
        )
    }

    fn finish_tensor(
        &self,
        py: Python<'_>,
        t: Py<PyAny>,
        requires_grad: &Bound<'_, PyAny>,
        hooks: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        if requires_grad.is_truthy()? {
            t.setattr(py, intern!(py, "requires_grad"), true)?;
        }
        if let Some(m) = metadata {
            if m.is_truthy()? {
                self.torch
                    .set_tensor_metadata
                    .call1(py, (t.clone_ref(py), m))?;
            }
        }
        if !hooks.is_none() && hooks.is_truthy()? {
            t.setattr(py, intern!(py, "_backward_hooks"), hooks)?;
        }
        Ok(t)
    }
}

#[pymethods]
impl TensorFactory {
    #[new]
    #[pyo3(signature = (archive, *, swap, all_cpu, verify, mapping, torch_fns, sizes, fallbacks))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        archive: Py<PyArchive>,
        swap: bool,
        all_cpu: bool,
        verify: bool,
        mapping: Option<Py<PyAny>>,
        torch_fns: &Bound<'_, PyDict>,
        sizes: Py<PyDict>,
        fallbacks: &Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        let get = |d: &Bound<'_, PyDict>, k: &str| -> PyResult<Py<PyAny>> {
            d.get_item(k)?
                .map(|v| v.unbind())
                .ok_or_else(|| PyRuntimeError::new_err(format!("TensorFactory needs '{k}'")))
        };
        let mut records = HashMap::new();
        {
            let a = archive.get();
            let plen = a.archive.prefix().len() + 1;
            for (i, r) in a.archive.records().iter().enumerate() {
                if let Some(key) = r.name.get(plen..).and_then(|n| n.strip_prefix("data/")) {
                    if r.name.as_bytes().get(plen - 1) == Some(&b'/')
                        && r.name.starts_with(a.archive.prefix())
                    {
                        records.insert(key.to_string(), (i, r.size));
                    }
                }
            }
        }
        let torch = Torch {
            empty_strided: get(torch_fns, "empty_strided")?,
            empty: get(torch_fns, "empty")?,
            untyped_storage: get(torch_fns, "UntypedStorage")?,
            frombuffer: get(torch_fns, "frombuffer")?,
            set_tensor_metadata: get(torch_fns, "set_tensor_metadata")?,
        };
        let _ = py;
        Ok(TensorFactory {
            archive,
            records,
            slots: HashMap::new(),
            jobs: Vec::new(),
            keepalive: Vec::new(),
            produced: 0,
            consumed: 0,
            swap,
            all_cpu,
            verify,
            mapping,
            untyped_cls: get(torch_fns, "UntypedStorage")?,
            uint8: get(torch_fns, "uint8")?,
            sizes,
            torch,
            py_persistent_load: get(fallbacks, "persistent_load")?,
            py_rebuild_v2: get(fallbacks, "rebuild_tensor_v2")?,
            py_rebuild_v3: get(fallbacks, "rebuild_tensor_v3")?,
            py_mapped_storage: get(fallbacks, "mapped_storage")?,
        })
    }

    /// Pending storages handed out / consumed by rebuilds (equal when none escaped).
    #[getter]
    fn counts(&self) -> (usize, usize) {
        (self.produced, self.consumed)
    }

    fn persistent_load(
        &mut self,
        py: Python<'_>,
        saved_id: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        if let Some(pending) = self.try_pending(py, saved_id)? {
            return Ok(pending);
        }
        self.py_persistent_load.call1(py, (saved_id,))
    }

    #[pyo3(signature = (storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None))]
    #[allow(clippy::too_many_arguments)]
    fn rebuild_tensor_v2(
        &mut self,
        py: Python<'_>,
        storage: &Bound<'_, PyAny>,
        storage_offset: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        stride: &Bound<'_, PyAny>,
        requires_grad: &Bound<'_, PyAny>,
        backward_hooks: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let Ok(pending) = storage.downcast::<PendingStorage>() else {
            let args = [
                storage,
                storage_offset,
                size,
                stride,
                requires_grad,
                backward_hooks,
            ];
            return call_with(py, &self.py_rebuild_v2, &args, metadata);
        };
        let dtype = pending.borrow().dtype.clone_ref(py);
        let t = self.build(py, pending, dtype.bind(py), storage_offset, size, stride)?;
        self.finish_tensor(py, t, requires_grad, backward_hooks, metadata)
    }

    #[pyo3(signature = (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None))]
    #[allow(clippy::too_many_arguments)]
    fn rebuild_tensor_v3(
        &mut self,
        py: Python<'_>,
        storage: &Bound<'_, PyAny>,
        storage_offset: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        stride: &Bound<'_, PyAny>,
        requires_grad: &Bound<'_, PyAny>,
        backward_hooks: &Bound<'_, PyAny>,
        dtype: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let pending = match storage.downcast::<PendingStorage>() {
            Ok(p) if self.sizes.bind(py).contains(dtype)? => p,
            _ => {
                let args = [
                    storage,
                    storage_offset,
                    size,
                    stride,
                    requires_grad,
                    backward_hooks,
                    dtype,
                ];
                return call_with(py, &self.py_rebuild_v3, &args, metadata);
            }
        };
        let t = self.build(py, pending, dtype, storage_offset, size, stride)?;
        self.finish_tensor(py, t, requires_grad, backward_hooks, metadata)
    }

    /// Reads every queued storage (GIL released, several threads) and lets go of
    /// the references that kept their memory alive.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let jobs = std::mem::take(&mut self.jobs);
        let archive = self.archive.get();
        let records = archive.archive.records();
        let verify = self.verify;
        let result = py.allow_threads(|| {
            let jobs: Vec<ReadJob<'_>> = jobs
                .iter()
                .map(|&(rec, addr, nbytes, swap)| ReadJob {
                    record: &records[rec],
                    // SAFETY: addr is the data_ptr() of a tensor or storage this factory
                    // created for exactly nbytes bytes and holds in `keepalive` until the
                    // read completes; each record's job targets distinct memory.
                    dst: unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, nbytes) },
                    swap,
                })
                .collect();
            archive.archive.read_many_into(jobs, num_threads(), verify)
        });
        self.keepalive.clear();
        result.map_err(at(&archive.file))
    }
}

impl TensorFactory {
    /// The fast path of persistent_load; `None` hands the id to the Python loader.
    fn try_pending(
        &mut self,
        py: Python<'_>,
        saved_id: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Ok(t) = saved_id.downcast::<PyTuple>() else {
            return Ok(None);
        };
        if t.len() != 5 {
            return Ok(None);
        }
        let typename = t.get_item(0)?;
        let is_storage = if let Ok(s) = typename.downcast::<PyString>() {
            s.to_str()? == "storage"
        } else if let Ok(b) = typename.downcast::<PyBytes>() {
            b.as_bytes() == b"storage"
        } else {
            false
        };
        if !is_storage {
            return Ok(None);
        }
        let key_obj = t.get_item(2)?;
        let Ok(key) = key_obj.downcast::<PyString>() else {
            return Ok(None);
        };
        let key = key.to_str()?;
        if let Some(slot) = self.slots.get(key) {
            if slot.bind(py).is_instance_of::<PendingStorage>() {
                self.produced += 1;
                return Ok(Some(slot.clone_ref(py)));
            }
            return Ok(None);
        }
        let location = t.get_item(3)?;
        let on_cpu = self.all_cpu
            || location
                .downcast::<PyString>()
                .map(|s| s.to_str().map(|l| l == "cpu").unwrap_or(false))
                .unwrap_or(false)
            || location
                .downcast::<PyBytes>()
                .map(|b| b.as_bytes() == b"cpu")
                .unwrap_or(false);
        if !on_cpu {
            return Ok(None);
        }
        let storage_type = t.get_item(1)?;
        let dtype = if storage_type.is(self.untyped_cls.bind(py)) {
            self.uint8.clone_ref(py)
        } else {
            match storage_type.getattr(intern!(py, "dtype")) {
                Ok(d) if self.sizes.bind(py).contains(&d)? => d.unbind(),
                _ => return Ok(None),
            }
        };
        let Ok(numel) = t.get_item(4)?.extract::<u64>() else {
            return Ok(None);
        };
        let Some(&(record, size)) = self.records.get(key) else {
            return Ok(None);
        };
        let (itemsize, swap_size) = self.sizes_of(py, dtype.bind(py))?;
        if numel.checked_mul(itemsize as u64) != Some(size) {
            return Ok(None); // the Python loader raises the precise error
        }
        let pending = Py::new(
            py,
            PendingStorage {
                record,
                dtype,
                nbytes: size as usize,
                swap: if self.swap { swap_size } else { 0 },
                storage: None,
                first: None,
            },
        )?
        .into_any();
        self.slots.insert(key.to_string(), pending.clone_ref(py));
        self.produced += 1;
        Ok(Some(pending))
    }
}
