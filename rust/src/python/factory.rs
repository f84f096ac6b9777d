//! `TensorFactory`: the per-tensor hot path of a load, natively.
//!
//! The Python loader (`serialization._ZipLoader`) owns the semantics; this object
//! runs its common case without Python bytecode. It has two drivers:
//!
//! * Python's unpickler: `persistent_load` for CPU storages returns a
//!   `PendingStorage`, and `rebuild_tensor_v2/v3` on one builds the tensor.
//! * The native unpickler (`unpickle.rs`, through `unpickle`), which does the same
//!   without the Python calls and argument tuples, through the `TensorBuilder` trait
//!   (`builder.rs`) this type implements.
//!
//! Either way a rebuild validates the view, allocates the tensor at its final size (or
//! views the mapped file), and queues its bytes; `finish` reads every queued record in
//! one call, on several threads, with the GIL released. Anything unusual is handed
//! back to the Python callables given at construction, so behaviour has a single
//! definition.
//!
//! The jobs are pieces of their own, which this facade holds and composes:
//! `dtypes` (what each dtype and storage class stands for), `slots` (which persistent
//! ids become slots, and their records), `tensors` (making tensors and storages) and
//! `reads` (queued reads, the prefetch worker, and `finish`).

mod dtypes;
mod reads;
mod slots;
mod tensors;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use rustc_hash::FxHashMap;

use self::dtypes::Dtypes;
use self::reads::Reads;
use self::slots::{Slot, SlotTable};
use self::tensors::{Request, TensorMaker, Torch};
use super::builder::{Extras, Retyped, TensorBuilder, View};
use super::errors::CheckpointError;
use super::reader::PyArchive;
use super::unpickle;

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

#[pyclass(module = "fastserial._fastserial")]
pub struct TensorFactory {
    /// First, so that it is dropped first: a factory dropped unfinished waits for
    /// its prefetch worker before anything else of the load goes.
    reads: Reads,
    archive: Py<PyArchive>,
    dtypes: Dtypes,
    slots: SlotTable,
    maker: TensorMaker,
    produced: usize,
    consumed: usize,
    /// Python fallbacks: persistent_load(saved_id), rebuild_v2(*args), rebuild_v3(*args).
    py_persistent_load: Py<PyAny>,
    py_rebuild_v2: Py<PyAny>,
    py_rebuild_v3: Py<PyAny>,
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

impl TensorFactory {
    fn view_error(&self, record: usize, msg: String) -> PyErr {
        let archive = self.archive.get();
        let name = &archive.archive.records()[record].name;
        CheckpointError::new_err(format!("{}: record '{name}': {msg}", archive.file))
    }

    /// The untyped storage behind a pending storage, creating it when needed.
    fn storage_of(&mut self, py: Python<'_>, p: &mut Slot) -> PyResult<Py<PyAny>> {
        self.maker.storage_of(py, &mut self.reads, p)
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
                None => p.slot.dtype(py),
            };
            let [offset, size, stride, requires_grad, hooks] =
                [args[1], args[2], args[3], args[4], args[5]];
            let (Some(size_v), Some(stride_v), Ok(off), Ok(requires_grad)) = (
                int_list(size),
                int_list(stride),
                offset.extract::<i64>(),
                requires_grad.downcast::<pyo3::types::PyBool>(),
            ) else {
                let record = p.slot.record;
                return Err(self.view_error(
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
                requires_grad: requires_grad.is_true(),
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
            if let Some((slot, slot_type)) = self.slots.pending(key.to_str()?) {
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
        let Some(slot) = self.slots.new_slot(py, &mut self.dtypes, parts, None)? else {
            return Ok(None);
        };
        let key: Box<str> = key_obj.downcast::<PyString>()?.to_str()?.into();
        let storage_type = items[1].clone().unbind();
        let pending = Py::new(py, PendingStorage { slot })?.into_any();
        self.slots
            .insert_pending(key, pending.clone_ref(py), storage_type);
        self.produced += 1;
        Ok(Some(pending))
    }
}

impl TensorBuilder for TensorFactory {
    type Slot = Slot;

    fn record_of(&mut self, key: &str) -> Option<usize> {
        self.slots.record_of(key)
    }

    fn record_count(&self) -> usize {
        self.slots.record_count()
    }

    fn slot_for(
        &mut self,
        py: Python<'_>,
        storage_type: &Bound<'_, PyAny>,
        cpu: bool,
        numel: u64,
        record: usize,
    ) -> PyResult<Option<Slot>> {
        self.slots
            .slot_for(py, &mut self.dtypes, storage_type, cpu, numel, record)
    }

    fn slot_has_type(&self, slot: &Slot, storage_type: &Bound<'_, PyAny>) -> bool {
        slot.is_of_type(storage_type)
    }

    fn slot_dtype<'py>(&self, py: Python<'py>, slot: &Slot) -> Bound<'py, PyAny> {
        slot.dtype(py)
    }

    /// As `torch.load` (`Slot::retyped`).
    fn retyped(
        &mut self,
        py: Python<'_>,
        first: &mut Slot,
        storage_type: &Bound<'_, PyAny>,
        numel: u64,
    ) -> PyResult<Retyped<Slot>> {
        let (maker, reads) = (&self.maker, &mut self.reads);
        first.retyped(py, &mut self.dtypes, storage_type, numel, |slot| {
            maker.storage_of(py, reads, slot)
        })
    }

    /// A tensor of `dtype` over the slot's storage, taking view `v`. `None` when the
    /// Python rebuild must make it (a dtype this factory does not know).
    fn build(
        &mut self,
        py: Python<'_>,
        p: &mut Slot,
        dtype: &Bound<'_, PyAny>,
        v: &View<'_>,
        extras: &Extras<'_, '_>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(info) = self.dtypes.dtype_info(py, dtype)? else {
            return Ok(None);
        };
        let (record, nbytes) = (p.record, p.nbytes);
        let (size, stride, off) = (v.size, v.stride, v.offset);
        if size.len() != stride.len() || off < 0 || size.iter().chain(stride).any(|&v| v < 0) {
            return Err(self.view_error(
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
                return Err(self.view_error(record, format!(
                    "tensor view (offset {off}, size {size:?}, stride {stride:?}) reaches past the end of its {nbytes}-byte storage"
                )));
            }
        }
        // Byte-swap by the tensor's dtype, also over an untyped (uint8) storage.
        let swap = self.slots.swap_width(&info);
        let numel = (nbytes / itemsize.max(1)) as i64;
        let dense = off == 0
            && numel as usize * itemsize == nbytes
            && nbytes > 0
            && is_dense(size, stride, numel);
        let t = if !p.has_memory() && dense {
            let request = Request {
                dtype,
                info,
                view: v,
                swap,
            };
            self.maker
                .fresh_tensor(py, &mut self.reads, &mut self.dtypes, p, &request)?
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
                self.maker.view_of(py, storage, dtype, v)?
            }
        };
        self.maker.finish_tensor(py, t, extras).map(Some)
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
        let untyped_cls = match torch_fns.get_item("untyped_global")? {
            // What the pickle's UntypedStorage global resolved to (the loader may
            // stand a guard in for the class).
            Some(g) => g.unbind(),
            None => get(torch_fns, "UntypedStorage")?,
        };
        let uint8 = get(torch_fns, "uint8")?;
        let py_persistent_load = get(fallbacks, "persistent_load")?;
        let py_rebuild_v2 = get(fallbacks, "rebuild_tensor_v2")?;
        let py_rebuild_v3 = get(fallbacks, "rebuild_tensor_v3")?;
        let py_mapped_storage = get(fallbacks, "mapped_storage")?;
        let prefetch = pack_small && from_dlpack.is_some() && mapping.is_none() && !swap;
        let mut factory = TensorFactory {
            reads: Reads::new(archive.clone_ref(py), verify),
            dtypes: Dtypes::new(sizes, dlpack_codes, untyped_cls, uint8),
            slots: SlotTable::new(archive.clone_ref(py), all_cpu, swap),
            maker: TensorMaker::new(
                archive.clone_ref(py),
                torch,
                mapping,
                py_mapped_storage,
                from_dlpack,
                pack_small,
            ),
            archive,
            produced: 0,
            consumed: 0,
            py_persistent_load,
            py_rebuild_v2,
            py_rebuild_v3,
        };
        if prefetch {
            factory.reads.start_prefetch(py, storages_named);
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
        self.maker.clear_templates();
        self.reads.finish(py)
    }
}
