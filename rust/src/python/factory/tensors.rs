//! Making the torch tensors and storages of a load: views of the mapped file, small
//! tensors over packed blocks (DLPack), new memory through `empty_strided` or a
//! template's `empty_like`, and a view of an existing storage. Reads of new memory
//! are queued on `Reads`; `TensorFactory::build` decides which path a tensor takes.

use pyo3::intern;
use pyo3::prelude::*;

pyo3::import_exception!(pickle, UnpicklingError);
use pyo3::types::{PyDict, PyTuple};
use rustc_hash::FxHashMap;

use super::dtypes::{DtypeInfo, Dtypes};
use super::reads::Reads;
use super::slots::Slot;
use crate::container::reader::Compression;
use crate::python::buffers::MappedBuffer;
use crate::python::builder::{Extras, View};
use crate::python::dlpack::{self, DLDataType};
use crate::python::errors::at;
use crate::python::reader::PyArchive;

/// The torch callables tensors are made with.
pub(super) struct Torch {
    pub(super) empty_strided: Py<PyAny>,
    pub(super) empty_like: Py<PyAny>,
    pub(super) empty: Py<PyAny>,
    pub(super) untyped_storage: Py<PyAny>,
    pub(super) frombuffer: Py<PyAny>,
    pub(super) set_tensor_metadata: Py<PyAny>,
}

/// One tensor to make: its dtype, what the load knows of it, its view, and the
/// byte-swap width its bytes are read with.
pub(super) struct Request<'a, 'py> {
    pub(super) dtype: &'a Bound<'py, PyAny>,
    pub(super) info: DtypeInfo,
    pub(super) view: &'a View<'a>,
    pub(super) swap: usize,
}

pub(super) struct TensorMaker {
    archive: Py<PyArchive>,
    torch: Torch,
    /// The first tensor made for each layout ([dtype, ndim, sizes.., strides..]).
    templates: FxHashMap<Vec<i64>, Py<PyAny>>,
    scratch: Vec<i64>,
    /// The mapped file of an mmap load.
    mapping: Option<Py<PyAny>>,
    /// Python's mapped_storage(record_name, nbytes, swap) -> UntypedStorage.
    py_mapped_storage: Py<PyAny>,
    /// `torch._C._from_dlpack`, when small tensors are packed into shared blocks
    /// (`dlpack.rs`).
    from_dlpack: Option<Py<PyAny>>,
    /// Pack small tensors of eager loads into blocks (`set_pack_small_tensors`).
    pack_small: bool,
}

impl TensorMaker {
    pub(super) fn new(
        archive: Py<PyArchive>,
        torch: Torch,
        mapping: Option<Py<PyAny>>,
        py_mapped_storage: Py<PyAny>,
        from_dlpack: Option<Py<PyAny>>,
        pack_small: bool,
    ) -> Self {
        TensorMaker {
            archive,
            torch,
            templates: FxHashMap::default(),
            scratch: Vec::new(),
            mapping,
            py_mapped_storage,
            from_dlpack,
            pack_small,
        }
    }

    /// Lets go of the templates (at `finish`: no tensor is made after it).
    pub(super) fn clear_templates(&mut self) {
        self.templates.clear();
    }

    /// The untyped storage behind a pending storage, creating it when needed.
    pub(super) fn storage_of(
        &self,
        py: Python<'_>,
        reads: &mut Reads,
        p: &mut Slot,
    ) -> PyResult<Py<PyAny>> {
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
            let name = &self.archive.get().archive.records()[p.record].name;
            let rel = name
                .split_once('/')
                .map(|x| x.1)
                .unwrap_or(name)
                .to_string();
            self.py_mapped_storage.call1(py, (rel, p.nbytes, p.swap))?
        } else {
            let s = self.torch.untyped_storage.call1(py, (p.nbytes,))?;
            if p.nbytes > 0 {
                let ptr: usize = s.call_method0(py, intern!(py, "data_ptr"))?.extract(py)?;
                reads.queue_storage(p.record, ptr, p.nbytes, p.swap, s.clone_ref(py));
            }
            s
        };
        p.storage = Some(s.clone_ref(py));
        Ok(s)
    }

    /// A tensor of `dtype` taking view `v` of `storage`.
    pub(super) fn view_of(
        &self,
        py: Python<'_>,
        storage: Py<PyAny>,
        dtype: &Bound<'_, PyAny>,
        v: &View<'_>,
    ) -> PyResult<Py<PyAny>> {
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "dtype"), dtype)?;
        let t = self.torch.empty.call(py, ((0,),), Some(&kwargs))?;
        t.call_method1(
            py,
            intern!(py, "set_"),
            (
                storage,
                v.offset,
                PyTuple::new(py, v.size)?,
                PyTuple::new(py, v.stride)?,
            ),
        )
    }

    /// A tensor owning the whole (untouched) storage: a view of the mapped file, or new
    /// memory whose read is queued. `None` when the mapped record cannot be viewed.
    pub(super) fn fresh_tensor(
        &mut self,
        py: Python<'_>,
        reads: &mut Reads,
        dtypes: &mut Dtypes,
        p: &mut Slot,
        r: &Request<'_, '_>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let (dtype, info, v, swap) = (r.dtype, r.info, r.view, r.swap);
        let numel = (p.nbytes / info.itemsize.max(1)) as i64;
        if let Some(mapping) = &self.mapping {
            let archive = self.archive.get();
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
                    if let Some(t) = self.dlpack_tensor(py, dtypes, r, dl, addr, map)? {
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
        if let Some(t) = self.packed_tensor(py, reads, dtypes, p, r)? {
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
        reads.queue_storage(p.record, ptr, p.nbytes, swap, storage);
        p.first = Some(t.clone_ref(py));
        Ok(Some(t))
    }

    /// A small tensor over memory of a shared block (`dlpack.rs`), its read queued.
    /// `None` when the tensor does not qualify.
    fn packed_tensor(
        &mut self,
        py: Python<'_>,
        reads: &mut Reads,
        dtypes: &mut Dtypes,
        p: &mut Slot,
        r: &Request<'_, '_>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(dl) = r.info.dl else {
            return Ok(None);
        };
        if !self.pack_small
            || self.from_dlpack.is_none()
            || p.nbytes == 0
            || p.nbytes > dlpack::SMALL_MAX
            || r.view.size.len() > dlpack::MAX_DIMS
        {
            return Ok(None);
        }
        let range = reads.small_range(p.record, p.nbytes, r.swap)?;
        let owner = range.block.clone();
        let Some(t) = self.dlpack_tensor(py, dtypes, r, dl, range.addr, owner)? else {
            return Ok(None);
        };
        reads.queue_small(p.record, p.nbytes, r.swap, range);
        p.first = Some(t.clone_ref(py));
        Ok(Some(t))
    }

    /// A tensor of `r`'s dtype (DLPack `dl`) with its view over the memory at `addr`,
    /// which `owner` keeps alive, made by torch's DLPack import. `None` when this
    /// torch gives the tensor another dtype than asked (checked once per dtype, which
    /// is then made the ordinary way).
    fn dlpack_tensor(
        &self,
        py: Python<'_>,
        dtypes: &mut Dtypes,
        r: &Request<'_, '_>,
        dl: DLDataType,
        addr: usize,
        owner: dlpack::Owner,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(from_dlpack) = &self.from_dlpack else {
            return Ok(None);
        };
        let v = r.view;
        let capsule = dlpack::capsule(py, addr, dl, v.size, v.stride, owner)?;
        let t = from_dlpack.call1(py, (capsule,))?;
        if let Some(info) = dtypes.info_mut(r.dtype) {
            if !info.dl_checked {
                let got = t.getattr(py, intern!(py, "dtype"))?;
                info.dl_checked = got.bind(py).is(r.dtype);
                if !info.dl_checked {
                    info.dl = None;
                    return Ok(None);
                }
            }
        }
        Ok(Some(t))
    }

    /// Sets what `_rebuild_tensor_v2/v3` sets on a tensor after building it.
    pub(super) fn finish_tensor(
        &self,
        py: Python<'_>,
        t: Py<PyAny>,
        e: &Extras<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        if e.requires_grad {
            // torch refuses gradients on integer tensors: from a file, that is a
            // malformed checkpoint, refused like one.
            t.setattr(py, intern!(py, "requires_grad"), true)
                .map_err(|err| UnpicklingError::new_err(format!("requires_grad=True: {err}")))?;
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
}
