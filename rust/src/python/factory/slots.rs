//! The storages a load's persistent ids name: the record each key stands for, and
//! the slot this load makes for it when it can make one natively.

use pyo3::prelude::*;
use pyo3::types::PyString;
use rustc_hash::FxHashMap;

use super::dtypes::{DtypeInfo, Dtypes};
use crate::python::builder::{text_of, Retyped};
use crate::python::reader::PyArchive;

/// A storage the pickle named, whose memory is created with its first tensor.
pub(crate) struct Slot {
    pub(super) record: usize,
    /// The storage class the persistent id named, and the dtype it stands for.
    pub(super) storage_type: Py<PyAny>,
    pub(super) dtype: Py<PyAny>,
    pub(super) nbytes: usize,
    /// Byte-swap width (0: none); fixed by the first tensor's dtype.
    pub(super) swap: usize,
    /// The untyped storage, once some tensor created it.
    pub(super) storage: Option<Py<PyAny>>,
    /// The first tensor built over it (its storage is fetched only if needed again).
    pub(super) first: Option<Py<PyAny>>,
}

impl Slot {
    pub(super) fn dtype<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.dtype.bind(py).clone()
    }
    pub(super) fn has_memory(&self) -> bool {
        self.storage.is_some() || self.first.is_some()
    }
    /// Whether a persistent id naming this slot's key with `storage_type` is this
    /// slot: the storage class is the same object (the common case, and cheap).
    pub(super) fn is_of_type(&self, storage_type: &Bound<'_, PyAny>) -> bool {
        storage_type.is(&self.storage_type)
    }

    /// This slot's key met again with `storage_type`, another class than its own: as
    /// `torch.load`, a storage of the new dtype over the same memory when the two
    /// agree on the length in bytes (the slot's, which is its record's), else the
    /// Python loader's answer (a storage of its own, or the precise error).
    /// `torch.save` writes such ids only for storages without data. `storage_of`
    /// makes (or fetches) this slot's storage.
    pub(super) fn retyped(
        &mut self,
        py: Python<'_>,
        dtypes: &mut Dtypes,
        storage_type: &Bound<'_, PyAny>,
        numel: u64,
        storage_of: impl FnOnce(&mut Slot) -> PyResult<Py<PyAny>>,
    ) -> PyResult<Retyped<Slot>> {
        let Some(dtype) = dtypes.storage_dtype(py, storage_type)? else {
            return Ok(Retyped::Python);
        };
        if dtype.is(&self.dtype) {
            return Ok(Retyped::Same);
        }
        let info = dtypes
            .dtype_info(py, dtype.bind(py))?
            .expect("checked by storage_dtype");
        if numel.checked_mul(info.itemsize as u64) != Some(self.nbytes as u64) {
            return Ok(Retyped::Python);
        }
        let storage = storage_of(self)?;
        Ok(Retyped::Shared(Slot {
            record: self.record,
            storage_type: storage_type.clone().unbind(),
            dtype,
            nbytes: self.nbytes,
            // The bytes were swapped (or not) by this slot's dtype, as torch does.
            swap: self.swap,
            storage: Some(storage),
            first: None,
        }))
    }
}

/// Which persistent ids this load makes slots for, and the pending storages handed
/// to Python's unpickler.
pub(super) struct SlotTable {
    archive: Py<PyArchive>,
    /// Reused to spell `data/KEY` when looking a storage's record up.
    name_buf: String,
    /// Pending storages handed to Python's unpickler, by key, with the storage
    /// class their persistent id named.
    pending: FxHashMap<Box<str>, (Py<PyAny>, Py<PyAny>)>,
    /// Every location lands on the CPU (map_location='cpu'); else only 'cpu' does.
    all_cpu: bool,
    /// The archive's byte order is not this machine's.
    swap: bool,
}

impl SlotTable {
    pub(super) fn new(archive: Py<PyArchive>, all_cpu: bool, swap: bool) -> Self {
        SlotTable {
            archive,
            name_buf: String::new(),
            pending: FxHashMap::default(),
            all_cpu,
            swap,
        }
    }

    /// The byte-swap width of a tensor of a dtype in this load (0: none).
    pub(super) fn swap_width(&self, info: &DtypeInfo) -> usize {
        if self.swap {
            info.swap_size
        } else {
            0
        }
    }

    /// The pending storage handed out for `key`, with the storage class its
    /// persistent id named.
    pub(super) fn pending(&self, key: &str) -> Option<&(Py<PyAny>, Py<PyAny>)> {
        self.pending.get(key)
    }

    pub(super) fn insert_pending(
        &mut self,
        key: Box<str>,
        pending: Py<PyAny>,
        storage_type: Py<PyAny>,
    ) {
        self.pending.insert(key, (pending, storage_type));
    }

    /// The index of record `data/KEY`, which identifies a storage within this load.
    pub(super) fn record_of(&mut self, key: &str) -> Option<usize> {
        if let Some(found) = self.archive.get().archive.storage_by_number(key) {
            return found;
        }
        self.name_buf.clear();
        self.name_buf.push_str("data/");
        self.name_buf.push_str(key);
        self.archive.get().archive.index_of(&self.name_buf)
    }

    pub(super) fn record_count(&self) -> usize {
        self.archive.get().archive.records().len()
    }

    /// The storage a persistent id `('storage', type, key, location, numel)` names, when
    /// this factory can make it; `None` hands the id to the Python loader. `record` is
    /// the key's record when the caller has looked it up already.
    pub(super) fn new_slot(
        &mut self,
        py: Python<'_>,
        dtypes: &mut Dtypes,
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
        self.slot_for(py, dtypes, storage_type, cpu, numel, record)
    }

    /// `new_slot` with the persistent id taken apart: the storage class, whether its
    /// location is 'cpu', its element count and its record.
    pub(super) fn slot_for(
        &mut self,
        py: Python<'_>,
        dtypes: &mut Dtypes,
        storage_type: &Bound<'_, PyAny>,
        cpu: bool,
        numel: u64,
        record: usize,
    ) -> PyResult<Option<Slot>> {
        if !self.all_cpu && !cpu {
            return Ok(None);
        }
        let Some(dtype) = dtypes.storage_dtype(py, storage_type)? else {
            return Ok(None);
        };
        let size = self.archive.get().archive.records()[record].size;
        let info = dtypes
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
            swap: self.swap_width(&info),
            storage: None,
            first: None,
        };
        Ok(Some(slot))
    }
}
