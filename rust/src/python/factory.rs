//! `TensorFactory`: the per-tensor hot path of a load, natively.
//!
//! The Python loader (`serialization._ZipLoader`) owns the semantics; this object
//! runs its common case without Python bytecode. It has two drivers:
//!
//! * Python's unpickler: `persistent_load` for CPU storages returns a
//!   `PendingStorage`, and `rebuild_tensor_v2/v3` on one builds the tensor.
//! * The native unpickler (`unpickle.rs`, through `unpickle`), which does the same
//!   without the Python calls and argument tuples.
//!
//! Either way a rebuild validates the view, allocates the tensor at its final size (or
//! views the mapped file), and queues its bytes; `finish` reads every queued record in
//! one call, on several threads, with the GIL released. Anything unusual is handed
//! back to the Python callables given at construction, so behaviour has a single
//! definition.

use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};
use rustc_hash::FxHashMap;

use super::buffers::MappedBuffer;
use std::sync::Arc;

use super::dlpack::{self, Block, DLDataType, Packer};
use super::errors::{at, CheckpointError};
use super::num_threads;
use super::reader::PyArchive;
use super::unpickle;
use crate::container::reader::{Compression, ReadJob};

/// A storage the pickle named, whose memory is created with its first tensor.
pub struct Slot {
    record: usize,
    /// The storage class the persistent id named, and the dtype it stands for.
    storage_type: Py<PyAny>,
    dtype: Py<PyAny>,
    nbytes: usize,
    /// Byte-swap width (0: none); fixed by the first tensor's dtype.
    swap: usize,
    /// The untyped storage, once some tensor created it.
    storage: Option<Py<PyAny>>,
    /// The first tensor built over it (its storage is fetched only if needed again).
    first: Option<Py<PyAny>>,
}

impl Slot {
    pub(crate) fn dtype<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.dtype.bind(py).clone()
    }
    fn has_memory(&self) -> bool {
        self.storage.is_some() || self.first.is_some()
    }
    /// Whether a persistent id naming this slot's key with `storage_type` is this
    /// slot: the storage class is the same object (the common case, and cheap).
    pub(crate) fn is_of_type(&self, storage_type: &Bound<'_, PyAny>) -> bool {
        storage_type.is(&self.storage_type)
    }
}

/// What a key met again under another storage class stands for (`TensorFactory::retyped`).
pub(crate) enum Retyped {
    /// The same dtype (UntypedStorage and ByteStorage, say): the slot itself.
    Same,
    /// A slot of the new dtype over the same storage.
    Shared(Slot),
    /// The Python loader decides (it raises the precise error).
    Python,
}

/// A `Slot` as a Python object, for Python's unpickler.
#[pyclass(module = "fastserial._fastserial")]
pub struct PendingStorage {
    slot: Slot,
}

#[pymethods]
impl PendingStorage {
    #[getter]
    fn dtype(&self, py: Python<'_>) -> Py<PyAny> {
        self.slot.dtype.clone_ref(py)
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.slot.nbytes
    }
    /// The untyped storage, creating it (and queueing its read) when no tensor has.
    fn untyped(slf: &Bound<'_, Self>, factory: &Bound<'_, TensorFactory>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        factory
            .borrow_mut()
            .storage_of(py, &mut slf.borrow_mut().slot)
    }
}

struct Torch {
    empty_strided: Py<PyAny>,
    empty_like: Py<PyAny>,
    empty: Py<PyAny>,
    untyped_storage: Py<PyAny>,
    frombuffer: Py<PyAny>,
    set_tensor_metadata: Py<PyAny>,
}

/// What a rebuild needs to know of a dtype.
#[derive(Clone, Copy)]
struct DtypeInfo {
    itemsize: usize,
    /// Element size to byte-swap by (complex numbers swap per component).
    swap_size: usize,
    /// How torch spells the dtype in DLPack, when small tensors of it are packed.
    dl: Option<DLDataType>,
    /// Whether a packed tensor has shown that `dl` comes back as this dtype.
    dl_checked: bool,
}

/// The view a tensor takes of its storage, in elements.
pub struct View<'a> {
    pub offset: i64,
    pub size: &'a [i64],
    pub stride: &'a [i64],
}

/// What `_rebuild_tensor_v2/v3` sets on a tensor after building it.
pub struct Extras<'a, 'py> {
    pub requires_grad: bool,
    /// `_backward_hooks`, set when non-empty.
    pub hooks: Option<&'a Bound<'py, PyAny>>,
    /// Tensor metadata, set when non-empty.
    pub metadata: Option<&'a Bound<'py, PyAny>>,
}

#[pyclass(module = "fastserial._fastserial")]
pub struct TensorFactory {
    archive: Py<PyArchive>,
    /// Reused to spell `data/KEY` when looking a storage's record up.
    name_buf: String,
    /// Pending storages handed to Python's unpickler, by key, with the storage
    /// class their persistent id named.
    slots: FxHashMap<Box<str>, (Py<PyAny>, Py<PyAny>)>,
    /// Reads queued until `finish`, each with what keeps its memory alive.
    jobs: Vec<Fill>,
    /// The first tensor made for each layout ([dtype, ndim, sizes.., strides..]).
    templates: FxHashMap<Vec<i64>, Py<PyAny>>,
    scratch: Vec<i64>,
    /// dtype -> its sizes (None: not one this factory builds). Holding each key keeps
    /// its identity unique for the factory's life.
    dtypes: Vec<(Py<PyAny>, Option<DtypeInfo>)>,
    /// storage class -> the dtype it stands for (None: not a storage class).
    storage_types: Vec<(Py<PyAny>, Option<Py<PyAny>>)>,
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
    /// `torch._C._from_dlpack` and dtype -> (code, bits), when small tensors are
    /// packed into shared blocks (`dlpack.rs`).
    from_dlpack: Option<Py<PyAny>>,
    dlpack_codes: Option<Py<PyDict>>,
    /// Pack small tensors of eager loads into blocks (`set_pack_small_tensors`).
    pack_small: bool,
    packer: Packer,
    prefetch: Option<Prefetch>,
}

/// Where a queued read lands, and what keeps that memory alive until it is done.
enum Dest {
    /// Memory of a packed block (`dlpack.rs`): this load's own, never resized.
    Block { _alive: Arc<Block> },
    /// Memory torch allocated for a storage, which the pickle (a BUILD handed to
    /// Python, say) may have resized or swapped since: `finish` reads the storage's
    /// address and size again, and fills it only if they are still the ones queued.
    Storage(Py<PyAny>),
}

/// One record's read, queued until `finish`.
struct Fill {
    record: usize,
    addr: usize,
    nbytes: usize,
    swap: usize,
    dest: Dest,
}

/// What a worker thread returns: the archive (to be let go of with the GIL held) and
/// the result of its reads.
type PrefetchResult = (Py<PyArchive>, crate::error::Result<()>);

/// Small records read into packed blocks on a worker thread while the pickle runs
/// (`TensorFactory::start_prefetch`).
struct Prefetch {
    /// record -> (address, index in `packer.blocks`) of its bytes, until a tensor
    /// takes them.
    slots: Vec<Option<(usize, usize)>>,
    /// (record, address, nbytes, block) of each prefetched record a tensor took.
    taken: Vec<(usize, usize, usize, Arc<Block>)>,
    worker: std::thread::JoinHandle<PrefetchResult>,
}

impl Drop for TensorFactory {
    /// A factory dropped unfinished (an error, or a pickle handed to Python's
    /// unpickler) waits for its worker: no write may land after the load is over.
    fn drop(&mut self) {
        if let Some(pf) = self.prefetch.take() {
            let _ = pf.worker.join();
        }
    }
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
    // The common case first: row-major contiguous.
    let mut expected = 1i64;
    let mut contiguous = true;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            contiguous = false;
            break;
        }
        expected = expected.saturating_mul(n);
    }
    if contiguous {
        return expected == numel;
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

/// A string or bytes object's text, for the parts of a persistent id.
pub(crate) fn text_of<'a>(obj: &'a Bound<'_, PyAny>) -> Option<std::borrow::Cow<'a, str>> {
    if let Ok(s) = obj.downcast::<PyString>() {
        return s.to_cow().ok();
    }
    let b = obj.downcast::<PyBytes>().ok()?;
    std::str::from_utf8(b.as_bytes())
        .ok()
        .map(|s| std::borrow::Cow::Owned(s.to_string()))
}

impl TensorFactory {
    fn archive<'a>(&'a self, _py: Python<'a>) -> &'a PyArchive {
        self.archive.get()
    }

    fn record_name(&self, py: Python<'_>, record: usize) -> String {
        self.archive(py).archive.records()[record].name.clone()
    }

    fn dtype_info(
        &mut self,
        py: Python<'_>,
        dtype: &Bound<'_, PyAny>,
    ) -> PyResult<Option<DtypeInfo>> {
        if let Some((_, info)) = self.dtypes.iter().find(|d| d.0.is(dtype)) {
            return Ok(*info);
        }
        let info = match self.sizes.bind(py).get_item(dtype)? {
            Some(v) => {
                let (itemsize, swap_size): (usize, usize) = v.extract()?;
                let dl = match &self.dlpack_codes {
                    Some(codes) => match codes.bind(py).get_item(dtype)? {
                        Some(c) => {
                            let (code, bits): (u8, u8) = c.extract()?;
                            Some(DLDataType {
                                code,
                                bits,
                                lanes: 1,
                            })
                        }
                        None => None,
                    },
                    None => None,
                };
                Some(DtypeInfo {
                    itemsize,
                    swap_size,
                    dl,
                    dl_checked: false,
                })
            }
            None => None,
        };
        self.dtypes.push((dtype.clone().unbind(), info));
        Ok(info)
    }

    /// The dtype a storage class in a persistent id stands for.
    fn storage_dtype(
        &mut self,
        py: Python<'_>,
        storage_type: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        if let Some((_, d)) = self.storage_types.iter().find(|d| d.0.is(storage_type)) {
            return Ok(d.as_ref().map(|d| d.clone_ref(py)));
        }
        let dtype = if storage_type.is(self.untyped_cls.bind(py)) {
            Some(self.uint8.clone_ref(py))
        } else {
            match storage_type.getattr(intern!(py, "dtype")) {
                Ok(d) if self.dtype_info(py, &d)?.is_some() => Some(d.unbind()),
                _ => None,
            }
        };
        self.storage_types.push((
            storage_type.clone().unbind(),
            dtype.as_ref().map(|d| d.clone_ref(py)),
        ));
        Ok(dtype)
    }

    /// The storage a persistent id `('storage', type, key, location, numel)` names, when
    /// this factory can make it; `None` hands the id to the Python loader. `record` is
    /// the key's record when the caller has looked it up already.
    pub(crate) fn new_slot(
        &mut self,
        py: Python<'_>,
        parts: [&Bound<'_, PyAny>; 5],
        record: Option<usize>,
    ) -> PyResult<Option<Slot>> {
        let [typename, storage_type, key, location, numel] = parts;
        if text_of(typename).as_deref() != Some("storage") {
            return Ok(None);
        }
        let Ok(key) = key.downcast::<PyString>() else {
            return Ok(None);
        };
        let cpu = text_of(location).as_deref() == Some("cpu");
        let Ok(numel) = numel.extract::<u64>() else {
            return Ok(None);
        };
        let Some(record) = record.or_else(|| self.record_of(key.to_str().ok()?)) else {
            return Ok(None);
        };
        self.slot_for(py, storage_type, cpu, numel, record)
    }

    /// `new_slot` with the persistent id taken apart: the storage class, whether its
    /// location is 'cpu', its element count and its record.
    pub(crate) fn slot_for(
        &mut self,
        py: Python<'_>,
        storage_type: &Bound<'_, PyAny>,
        cpu: bool,
        numel: u64,
        record: usize,
    ) -> PyResult<Option<Slot>> {
        if !self.all_cpu && !cpu {
            return Ok(None);
        }
        let Some(dtype) = self.storage_dtype(py, storage_type)? else {
            return Ok(None);
        };
        let size = self.archive.get().archive.records()[record].size;
        let info = self
            .dtype_info(py, dtype.bind(py))?
            .expect("checked by storage_dtype");
        if numel.checked_mul(info.itemsize as u64) != Some(size) {
            return Ok(None); // the Python loader raises the precise error
        }
        let slot = Slot {
            record,
            storage_type: storage_type.clone().unbind(),
            dtype,
            nbytes: size as usize,
            swap: if self.swap { info.swap_size } else { 0 },
            storage: None,
            first: None,
        };
        Ok(Some(slot))
    }

    /// A key met again with `storage_type`, another class than its slot's: as
    /// `torch.load`, a storage of the new dtype over the same memory when the two
    /// agree on the length in bytes (the slot's, which is its record's), else the
    /// Python loader's answer (a storage of its own, or the precise error).
    /// `torch.save` writes such ids only for storages without data.
    pub(crate) fn retyped(
        &mut self,
        py: Python<'_>,
        first: &mut Slot,
        storage_type: &Bound<'_, PyAny>,
        numel: u64,
    ) -> PyResult<Retyped> {
        let Some(dtype) = self.storage_dtype(py, storage_type)? else {
            return Ok(Retyped::Python);
        };
        if dtype.is(&first.dtype) {
            return Ok(Retyped::Same);
        }
        let info = self
            .dtype_info(py, dtype.bind(py))?
            .expect("checked by storage_dtype");
        if numel.checked_mul(info.itemsize as u64) != Some(first.nbytes as u64) {
            return Ok(Retyped::Python);
        }
        let storage = self.storage_of(py, first)?;
        Ok(Retyped::Shared(Slot {
            record: first.record,
            storage_type: storage_type.clone().unbind(),
            dtype,
            nbytes: first.nbytes,
            // The bytes were swapped (or not) by the first slot's dtype, as torch does.
            swap: first.swap,
            storage: Some(storage),
            first: None,
        }))
    }

    /// The index of record `data/KEY`, which identifies a storage within this load.
    pub(crate) fn record_of(&mut self, key: &str) -> Option<usize> {
        if let Some(found) = self.archive.get().archive.storage_by_number(key) {
            return found;
        }
        self.name_buf.clear();
        self.name_buf.push_str("data/");
        self.name_buf.push_str(key);
        self.archive.get().archive.index_of(&self.name_buf)
    }

    pub(crate) fn record_count(&self) -> usize {
        self.archive.get().archive.records().len()
    }

    /// The untyped storage behind a pending storage, creating it when needed.
    fn storage_of(&mut self, py: Python<'_>, p: &mut Slot) -> PyResult<Py<PyAny>> {
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
                self.jobs.push(Fill {
                    record: p.record,
                    addr: ptr,
                    nbytes: p.nbytes,
                    swap: p.swap,
                    dest: Dest::Storage(s.clone_ref(py)),
                });
            }
            s
        };
        p.storage = Some(s.clone_ref(py));
        Ok(s)
    }

    fn view_error(&self, py: Python<'_>, record: usize, msg: String) -> PyErr {
        let name = self.record_name(py, record);
        CheckpointError::new_err(format!("{}: record '{name}': {msg}", self.archive(py).file))
    }

    /// A tensor of `dtype` over the slot's storage, taking view `v`. `None` when the
    /// Python rebuild must make it (a dtype this factory does not know).
    pub(crate) fn build(
        &mut self,
        py: Python<'_>,
        p: &mut Slot,
        dtype: &Bound<'_, PyAny>,
        v: &View<'_>,
        extras: &Extras<'_, '_>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(info) = self.dtype_info(py, dtype)? else {
            return Ok(None);
        };
        let (record, nbytes) = (p.record, p.nbytes);
        let (size, stride, off) = (v.size, v.stride, v.offset);
        if size.len() != stride.len() || off < 0 || size.iter().chain(stride).any(|&v| v < 0) {
            return Err(self.view_error(
                py,
                record,
                format!("invalid tensor view (offset {off}, size {size:?}, stride {stride:?})"),
            ));
        }
        let itemsize = info.itemsize;
        if !size.contains(&0) {
            let extent = size.iter().zip(stride).try_fold(off, |acc, (&n, &s)| {
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
        let swap = if self.swap { info.swap_size } else { 0 };
        let numel = (nbytes / itemsize.max(1)) as i64;
        let dense = off == 0
            && numel as usize * itemsize == nbytes
            && nbytes > 0
            && is_dense(size, stride, numel);
        let t = if !p.has_memory() && dense {
            self.fresh_tensor(py, p, dtype, info, v, swap)?
        } else {
            None
        };
        let t = match t {
            Some(t) => t,
            None => {
                if !p.has_memory() {
                    // Fix the swap width to this tensor's dtype before the storage is created.
                    p.swap = swap;
                }
                let storage = self.storage_of(py, p)?;
                let kwargs = PyDict::new(py);
                kwargs.set_item(intern!(py, "dtype"), dtype)?;
                let t = self.torch.empty.call(py, ((0,),), Some(&kwargs))?;
                t.call_method1(
                    py,
                    intern!(py, "set_"),
                    (
                        storage,
                        off,
                        PyTuple::new(py, size)?,
                        PyTuple::new(py, stride)?,
                    ),
                )?
            }
        };
        self.finish_tensor(py, t, extras).map(Some)
    }

    /// A tensor owning the whole (untouched) storage: a view of the mapped file, or new
    /// memory whose read is queued. `None` when the mapped record cannot be viewed.
    fn fresh_tensor(
        &mut self,
        py: Python<'_>,
        p: &mut Slot,
        dtype: &Bound<'_, PyAny>,
        info: DtypeInfo,
        v: &View<'_>,
        swap: usize,
    ) -> PyResult<Option<Py<PyAny>>> {
        let numel = (p.nbytes / info.itemsize.max(1)) as i64;
        if let Some(mapping) = &self.mapping {
            let archive = self.archive(py);
            let rec = &archive.archive.records()[p.record];
            let data_offset = archive.archive.offset_of(rec).map_err(at(&archive.file))?;
            // Zero-copy only for records on torch's 64-byte alignment: anything else
            // (archives re-zipped without padding) is copied to aligned memory.
            let plain =
                rec.compression == Compression::Stored && swap <= 1 && data_offset % 64 == 0;
            if !plain {
                return Ok(None);
            }
            // Through DLPack (half the cost of frombuffer), holding the mapping.
            let mapped = mapping
                .bind(py)
                .downcast::<MappedBuffer>()
                .ok()
                .map(|m| m.get().base_and_map());
            if let (Some(dl), Some((base, map))) = (info.dl, mapped) {
                if v.size.len() <= dlpack::MAX_DIMS && self.from_dlpack.is_some() {
                    let addr = base + data_offset as usize;
                    if let Some(t) = self.dlpack_tensor(py, dtype, dl, addr, v, map)? {
                        p.first = Some(t.clone_ref(py));
                        return Ok(Some(t));
                    }
                }
            }
            let mapping = self.mapping.as_ref().expect("in the mapping branch");
            let kwargs = PyDict::new(py);
            kwargs.set_item(intern!(py, "dtype"), dtype)?;
            kwargs.set_item(intern!(py, "count"), numel)?;
            kwargs.set_item(intern!(py, "offset"), data_offset)?;
            let t = self
                .torch
                .frombuffer
                .call(py, (mapping.clone_ref(py),), Some(&kwargs))?;
            if v.size.len() != 1 || v.size[0] != numel || v.stride[0] != 1 {
                t.call_method1(
                    py,
                    intern!(py, "as_strided_"),
                    (PyTuple::new(py, v.size)?, PyTuple::new(py, v.stride)?, 0),
                )?;
            }
            p.first = Some(t.clone_ref(py));
            return Ok(Some(t));
        }
        if let Some(t) = self.packed_tensor(py, p, dtype, info, v, swap)? {
            return Ok(Some(t));
        }
        // Tensors of a layout seen before are made with `empty_like` on the previous
        // one, which skips parsing sizes and keywords (most of the cost of a small
        // tensor); for a dense tensor it keeps the exact strides.
        let key = &mut self.scratch;
        key.clear();
        key.push(dtype.as_ptr() as i64);
        key.push(v.size.len() as i64);
        key.extend_from_slice(v.size);
        key.extend_from_slice(v.stride);
        // A template is the previous tensor of this layout, which the pickle may have
        // changed since (a BUILD handed to Python): the new tensor's storage is
        // checked to be exactly this record's size before it is used.
        let mut made = None;
        if let Some(prev) = self.templates.get(key.as_slice()) {
            let t = self.torch.empty_like.call1(py, (prev,))?;
            let storage = t.call_method0(py, intern!(py, "untyped_storage"))?;
            let n: usize = storage
                .call_method0(py, intern!(py, "nbytes"))?
                .extract(py)?;
            if n == p.nbytes {
                made = Some((t, storage));
            } else {
                self.templates.remove(key.as_slice());
            }
        }
        let (t, storage) = match made {
            Some(m) => m,
            None => {
                let kwargs = PyDict::new(py);
                kwargs.set_item(intern!(py, "dtype"), dtype)?;
                let t = self.torch.empty_strided.call(
                    py,
                    (PyTuple::new(py, v.size)?, PyTuple::new(py, v.stride)?),
                    Some(&kwargs),
                )?;
                let key = self.scratch.clone();
                self.templates.insert(key, t.clone_ref(py));
                let storage = t.call_method0(py, intern!(py, "untyped_storage"))?;
                (t, storage)
            }
        };
        let ptr: usize = storage
            .call_method0(py, intern!(py, "data_ptr"))?
            .extract(py)?;
        self.jobs.push(Fill {
            record: p.record,
            addr: ptr,
            nbytes: p.nbytes,
            swap,
            dest: Dest::Storage(storage),
        });
        p.first = Some(t.clone_ref(py));
        Ok(Some(t))
    }

    /// A small tensor over memory of a shared block (`dlpack.rs`), its read queued.
    /// `None` when the tensor does not qualify.
    fn packed_tensor(
        &mut self,
        py: Python<'_>,
        p: &mut Slot,
        dtype: &Bound<'_, PyAny>,
        info: DtypeInfo,
        v: &View<'_>,
        swap: usize,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(dl) = info.dl else {
            return Ok(None);
        };
        if !self.pack_small
            || self.from_dlpack.is_none()
            || p.nbytes == 0
            || p.nbytes > dlpack::SMALL_MAX
            || v.size.len() > dlpack::MAX_DIMS
        {
            return Ok(None);
        }
        let prefetched = match &mut self.prefetch {
            Some(pf) if swap == 0 => pf.slots.get_mut(p.record).and_then(Option::take),
            _ => None,
        };
        let (addr, block) = match prefetched {
            Some((addr, block)) => (addr, self.packer.blocks[block].clone()),
            None => self.packer.alloc(p.nbytes)?,
        };
        let block_of_tensor = block.clone();
        let Some(t) = self.dlpack_tensor(py, dtype, dl, addr, v, block)? else {
            return Ok(None);
        };
        match (&mut self.prefetch, prefetched) {
            (Some(pf), Some(_)) => pf.taken.push((p.record, addr, p.nbytes, block_of_tensor)),
            _ => self.jobs.push(Fill {
                record: p.record,
                addr,
                nbytes: p.nbytes,
                swap,
                dest: Dest::Block {
                    _alive: block_of_tensor,
                },
            }),
        }
        p.first = Some(t.clone_ref(py));
        Ok(Some(t))
    }

    /// A tensor of `dtype` (DLPack `dl`) with view `v` over the memory at `addr`,
    /// which `owner` keeps alive, made by torch's DLPack import. `None` when this
    /// torch gives the tensor another dtype than asked (checked once per dtype, which
    /// is then made the ordinary way).
    fn dlpack_tensor(
        &mut self,
        py: Python<'_>,
        dtype: &Bound<'_, PyAny>,
        dl: DLDataType,
        addr: usize,
        v: &View<'_>,
        owner: dlpack::Owner,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(from_dlpack) = &self.from_dlpack else {
            return Ok(None);
        };
        let capsule = dlpack::capsule(py, addr, dl, v.size, v.stride, owner)?;
        let t = from_dlpack.call1(py, (capsule,))?;
        let entry = self.dtypes.iter_mut().find(|d| d.0.is(dtype));
        if let Some(info) = entry.and_then(|e| e.1.as_mut()) {
            if !info.dl_checked {
                let got = t.getattr(py, intern!(py, "dtype"))?;
                info.dl_checked = got.bind(py).is(dtype);
                if !info.dl_checked {
                    info.dl = None;
                    return Ok(None);
                }
            }
        }
        Ok(Some(t))
    }

    /// Starts reading every small `data/` record into packed blocks on a worker
    /// thread, so the reads overlap the pickle's run on this one. A record no tensor
    /// takes was read for nothing; its memory goes with the blocks.
    /// `storages_named` is how many persistent ids the pickle holds (the scan's
    /// count): a file with more small records than that has records no tensor
    /// can use, and is read on demand instead, so the work stays proportional to
    /// what the pickle uses.
    fn start_prefetch(&mut self, py: Python<'_>, storages_named: usize) {
        const MIN_RECORDS: usize = 16;
        let archive = self.archive.get();
        let records = archive.archive.records();
        let data_dir = format!("{}/data/", archive.archive.prefix());
        let small: Vec<usize> = (0..records.len())
            .filter(|&i| {
                let r = &records[i];
                r.name.starts_with(&data_dir) && r.size > 0 && r.size <= dlpack::SMALL_MAX as u64
            })
            .collect();
        if small.len() < MIN_RECORDS || small.len() > storages_named {
            return;
        }
        let mut slots = vec![None; records.len()];
        let mut list = Vec::with_capacity(small.len());
        for i in small {
            let n = records[i].size as usize;
            let Ok((addr, _)) = self.packer.alloc(n) else {
                return;
            };
            slots[i] = Some((addr, self.packer.blocks.len() - 1));
            list.push((i, addr, n));
        }
        let blocks = self.packer.blocks.clone();
        let worker_archive = self.archive.clone_ref(py);
        let (verify, threads) = (self.verify, num_threads().saturating_sub(1).max(1));
        let worker = std::thread::Builder::new()
            .name("fastserial-prefetch".into())
            .spawn(move || {
                let result = {
                    let archive = &worker_archive.get().archive;
                    let records = archive.records();
                    // read_many_into first reads the local headers open left unread.
                    let jobs: Vec<ReadJob<'_>> = list
                        .iter()
                        .map(|&(rec, addr, n)| ReadJob {
                            record: &records[rec],
                            // SAFETY: each (addr, n) is a distinct range that
                            // `Packer::alloc` carved from a block in `blocks`, which
                            // this thread holds until the reads end. Nothing else
                            // writes it meanwhile: the tensors made over it reach the
                            // caller only after `finish` has joined this thread, and a
                            // factory dropped unfinished joins it in `Drop`; the
                            // unpickler runs only inert globals, which read no data.
                            dst: unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, n) },
                            swap: 0,
                        })
                        .collect();
                    archive.read_many_into(jobs, threads, verify)
                };
                drop(blocks);
                (worker_archive, result)
            });
        if let Ok(worker) = worker {
            self.prefetch = Some(Prefetch {
                slots,
                taken: Vec::new(),
                worker,
            });
        }
    }

    fn finish_tensor(
        &self,
        py: Python<'_>,
        t: Py<PyAny>,
        e: &Extras<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        if e.requires_grad {
            t.setattr(py, intern!(py, "requires_grad"), true)?;
        }
        if let Some(m) = e.metadata {
            if m.is_truthy()? {
                self.torch
                    .set_tensor_metadata
                    .call1(py, (t.clone_ref(py), m))?;
            }
        }
        if let Some(hooks) = e.hooks {
            if !hooks.is_none() && hooks.is_truthy()? {
                t.setattr(py, intern!(py, "_backward_hooks"), hooks)?;
            }
        }
        Ok(t)
    }

    /// `rebuild_tensor_v2/v3` with Python arguments: torch's `(storage, offset, size,
    /// stride, requires_grad, hooks)`, then v3's dtype (`args[6]`). A pending storage
    /// is built here; anything else goes to the Python rebuild of that version.
    fn rebuild_from_python(
        &mut self,
        py: Python<'_>,
        args: &[&Bound<'_, PyAny>],
        metadata: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let dtype = args.get(6).copied();
        if let Ok(pending) = args[0].downcast::<PendingStorage>() {
            let mut p = pending.borrow_mut();
            let dtype = match dtype {
                Some(d) => d.clone(),
                None => p.slot.dtype.bind(py).clone(),
            };
            let [offset, size, stride, requires_grad, hooks] =
                [args[1], args[2], args[3], args[4], args[5]];
            let (Some(size_v), Some(stride_v), Ok(off)) =
                (int_list(size), int_list(stride), offset.extract::<i64>())
            else {
                let record = p.slot.record;
                return Err(self.view_error(
                    py,
                    record,
                    format!("invalid tensor view (offset {offset}, size {size}, stride {stride})"),
                ));
            };
            let view = View {
                offset: off,
                size: &size_v,
                stride: &stride_v,
            };
            let extras = Extras {
                requires_grad: requires_grad.is_truthy()?,
                hooks: Some(hooks),
                metadata,
            };
            if let Some(t) = self.build(py, &mut p.slot, &dtype, &view, &extras)? {
                self.consumed += 1;
                return Ok(t);
            }
        }
        let fallback = if dtype.is_some() {
            &self.py_rebuild_v3
        } else {
            &self.py_rebuild_v2
        };
        call_with(py, fallback, args, metadata)
    }

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
        let key_obj = t.get_item(2)?;
        if let Ok(key) = key_obj.downcast::<PyString>() {
            if let Some((slot, slot_type)) = self.slots.get(key.to_str()?) {
                let slot = slot.clone_ref(py);
                let storage_type = t.get_item(1)?;
                if !storage_type.is(slot_type) {
                    let pending = slot.bind(py).downcast::<PendingStorage>()?;
                    let Ok(numel) = t.get_item(4)?.extract::<u64>() else {
                        return Ok(None);
                    };
                    let retyped =
                        self.retyped(py, &mut pending.borrow_mut().slot, &storage_type, numel)?;
                    match retyped {
                        Retyped::Same => {}
                        Retyped::Shared(slot) => {
                            self.produced += 1;
                            return Ok(Some(Py::new(py, PendingStorage { slot })?.into_any()));
                        }
                        Retyped::Python => return Ok(None),
                    }
                }
                self.produced += 1;
                return Ok(Some(slot));
            }
        }
        let items: Vec<Bound<'_, PyAny>> = t.iter().collect();
        let parts = [&items[0], &items[1], &items[2], &items[3], &items[4]];
        let Some(slot) = self.new_slot(py, parts, None)? else {
            return Ok(None);
        };
        let key: Box<str> = key_obj.downcast::<PyString>()?.to_str()?.into();
        let storage_type = items[1].clone().unbind();
        let pending = Py::new(py, PendingStorage { slot })?.into_any();
        self.slots
            .insert(key, (pending.clone_ref(py), storage_type));
        self.produced += 1;
        Ok(Some(pending))
    }
}

#[pymethods]
impl TensorFactory {
    #[new]
    #[pyo3(signature = (archive, *, swap, all_cpu, verify, mapping, torch_fns, sizes, fallbacks, from_dlpack=None, dlpack_codes=None, pack_small=true, storages_named=usize::MAX))]
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
        from_dlpack: Option<Py<PyAny>>,
        dlpack_codes: Option<Py<PyDict>>,
        pack_small: bool,
        storages_named: usize,
    ) -> PyResult<Self> {
        let get = |d: &Bound<'_, PyDict>, k: &str| -> PyResult<Py<PyAny>> {
            d.get_item(k)?
                .map(|v| v.unbind())
                .ok_or_else(|| PyRuntimeError::new_err(format!("TensorFactory needs '{k}'")))
        };
        let torch = Torch {
            empty_strided: get(torch_fns, "empty_strided")?,
            empty_like: get(torch_fns, "empty_like")?,
            empty: get(torch_fns, "empty")?,
            untyped_storage: get(torch_fns, "UntypedStorage")?,
            frombuffer: get(torch_fns, "frombuffer")?,
            set_tensor_metadata: get(torch_fns, "set_tensor_metadata")?,
        };
        let mut factory = TensorFactory {
            archive,
            name_buf: String::new(),
            slots: FxHashMap::default(),
            jobs: Vec::new(),
            templates: FxHashMap::default(),
            scratch: Vec::new(),
            dtypes: Vec::new(),
            storage_types: Vec::new(),
            produced: 0,
            consumed: 0,
            swap,
            all_cpu,
            verify,
            mapping,
            // What the pickle's UntypedStorage global resolved to (the loader may
            // stand a guard in for the class).
            untyped_cls: match torch_fns.get_item("untyped_global")? {
                Some(g) => g.unbind(),
                None => get(torch_fns, "UntypedStorage")?,
            },
            uint8: get(torch_fns, "uint8")?,
            sizes,
            torch,
            py_persistent_load: get(fallbacks, "persistent_load")?,
            py_rebuild_v2: get(fallbacks, "rebuild_tensor_v2")?,
            py_rebuild_v3: get(fallbacks, "rebuild_tensor_v3")?,
            py_mapped_storage: get(fallbacks, "mapped_storage")?,
            from_dlpack,
            dlpack_codes,
            pack_small,
            packer: Packer::default(),
            prefetch: None,
        };
        if factory.pack_small
            && factory.from_dlpack.is_some()
            && factory.mapping.is_none()
            && !factory.swap
        {
            factory.start_prefetch(py, storages_named);
        }
        Ok(factory)
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
        let args = [
            storage,
            storage_offset,
            size,
            stride,
            requires_grad,
            backward_hooks,
        ];
        self.rebuild_from_python(py, &args, metadata)
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
        let args = [
            storage,
            storage_offset,
            size,
            stride,
            requires_grad,
            backward_hooks,
            dtype,
        ];
        self.rebuild_from_python(py, &args, metadata)
    }

    /// Runs a state-dict pickle natively (`unpickle::run`). Returns `(True, result)`,
    /// or `(False, None)` when the pickle needs the ordinary unpickler: then this
    /// factory must be discarded, as it may hold storages of a half-run pickle.
    /// `objects` maps each `(module, name)` the pickle imports to what the loader's
    /// `find_class` resolved; `natives` maps the tensor rebuild functions to 2 or 3.
    /// `memo_read` is the scan's bitmap of the memo keys a GET reads (see
    /// `PickleScan::memo_read`): the others are not kept.
    #[pyo3(signature = (data, objects, natives, ordered_dict, memo_read=None))]
    fn unpickle(
        &mut self,
        py: Python<'_>,
        data: &[u8],
        objects: &Bound<'_, PyDict>,
        natives: &Bound<'_, PyDict>,
        ordered_dict: Py<PyAny>,
        memo_read: Option<&[u8]>,
    ) -> PyResult<(bool, Py<PyAny>)> {
        let mut globals = unpickle::Globals {
            objects: FxHashMap::default(),
            natives: FxHashMap::default(),
            ordered_dict,
            memo_read: memo_read.map(<[u8]>::to_vec),
        };
        for (k, v) in objects.iter() {
            globals.objects.insert(k.extract()?, v.unbind());
        }
        for (k, v) in natives.iter() {
            let kind = match v.extract::<u8>()? {
                2 => unpickle::Native::RebuildV2,
                3 => unpickle::Native::RebuildV3,
                other => {
                    return Err(PyRuntimeError::new_err(format!(
                        "unknown rebuild version {other}"
                    )))
                }
            };
            globals.natives.insert(k.extract()?, kind);
        }
        Ok(match unpickle::run(py, self, data, &globals)? {
            unpickle::Outcome::Done(v) => (true, v),
            unpickle::Outcome::Unsupported => (false, py.None()),
        })
    }

    /// Reads every queued storage (GIL released, several threads) and lets go of
    /// what kept their memory alive. A storage the pickle resized or swapped since
    /// its read was queued is refused, never written.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let mut jobs = std::mem::take(&mut self.jobs);
        if let Some(pf) = self.prefetch.take() {
            let joined = py.allow_threads(|| pf.worker.join());
            if !matches!(joined, Ok((_, Ok(())))) {
                // Read again what tensors took, so an error names its record, and
                // one in a record no tensor uses fails nothing.
                jobs.extend(
                    pf.taken
                        .into_iter()
                        .map(|(record, addr, nbytes, block)| Fill {
                            record,
                            addr,
                            nbytes,
                            swap: 0,
                            dest: Dest::Block { _alive: block },
                        }),
                );
            }
        }
        self.templates.clear();
        for job in &jobs {
            if let Dest::Storage(storage) = &job.dest {
                let s = storage.bind(py);
                let n: usize = s.call_method0(intern!(py, "nbytes"))?.extract()?;
                let addr: usize = s.call_method0(intern!(py, "data_ptr"))?.extract()?;
                if n != job.nbytes || addr != job.addr {
                    let name = self.record_name(py, job.record);
                    return Err(CheckpointError::new_err(format!(
                        "{}: record '{name}': the pickle changed this storage (now {n} bytes) \
                         before its {} bytes were read; refusing to write into it",
                        self.archive(py).file,
                        job.nbytes
                    )));
                }
            }
        }
        let archive = self.archive.get();
        let records = archive.archive.records();
        let verify = self.verify;
        let result = py.allow_threads(|| {
            let reads: Vec<ReadJob<'_>> = jobs
                .iter()
                .map(|job| ReadJob {
                    record: &records[job.record],
                    // SAFETY: `job.dest` keeps this memory alive until the reads end
                    // (`jobs` outlives them): a packed block this load carved the
                    // range from, or a torch storage of exactly `nbytes` whose address
                    // was read again above, with the GIL held and no Python code run
                    // since. The storages and the tensors over them have not reached
                    // the caller yet, so no other thread can resize them meanwhile;
                    // each record's job targets distinct memory.
                    dst: unsafe { std::slice::from_raw_parts_mut(job.addr as *mut u8, job.nbytes) },
                    swap: job.swap,
                })
                .collect();
            archive.archive.read_many_into(reads, num_threads(), verify)
        });
        drop(jobs);
        self.packer = Packer::default();
        result.map_err(at(&archive.file))
    }
}
