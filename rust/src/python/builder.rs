//! What the native unpickler asks of whatever makes its storages and tensors.
//!
//! `unpickle.rs` runs a pickle's opcodes; `factory.rs` makes torch objects. This
//! module is the seam between them: the unpickler is generic over `TensorBuilder`,
//! the factory implements it, and neither imports the other.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

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

/// What a key met again under another storage class stands for
/// (`TensorBuilder::retyped`).
pub enum Retyped<S> {
    /// The same dtype (UntypedStorage and ByteStorage, say): the slot itself.
    Same,
    /// A slot of the new dtype over the same storage.
    Shared(S),
    /// The Python loader decides (it raises the precise error).
    Python,
}

/// Storages and tensors for the native unpickler. Every `None` (or
/// `Retyped::Python`) hands the pickle to the ordinary unpickler, which decides.
pub(crate) trait TensorBuilder {
    /// A storage a persistent id named, whose memory is created with its first tensor.
    type Slot;

    /// The index of record `data/KEY`, which identifies a storage within this load.
    fn record_of(&mut self, key: &str) -> Option<usize>;

    /// How many records the archive holds (every record index is below it).
    fn record_count(&self) -> usize;

    /// The slot for a persistent id `('storage', type, key, location, numel)` taken
    /// apart: the storage class, whether its location is 'cpu', its element count
    /// and its key's record.
    fn slot_for(
        &mut self,
        py: Python<'_>,
        storage_type: &Bound<'_, PyAny>,
        cpu: bool,
        numel: u64,
        record: usize,
    ) -> PyResult<Option<Self::Slot>>;

    /// Whether a persistent id naming `slot`'s key with `storage_type` is `slot`: the
    /// storage class is the same object (the common case, and cheap).
    fn slot_has_type(&self, slot: &Self::Slot, storage_type: &Bound<'_, PyAny>) -> bool;

    /// The dtype `slot`'s storage class stands for (what a v2 rebuild takes).
    fn slot_dtype<'py>(&self, py: Python<'py>, slot: &Self::Slot) -> Bound<'py, PyAny>;

    /// `slot`'s key met again with `storage_type`, another class than the slot's.
    fn retyped(
        &mut self,
        py: Python<'_>,
        slot: &mut Self::Slot,
        storage_type: &Bound<'_, PyAny>,
        numel: u64,
    ) -> PyResult<Retyped<Self::Slot>>;

    /// A tensor of `dtype` over `slot`'s storage, taking view `v`, with `extras` set.
    /// An invalid view is an error (a `CheckpointError`, as the Python loader raises).
    fn build(
        &mut self,
        py: Python<'_>,
        slot: &mut Self::Slot,
        dtype: &Bound<'_, PyAny>,
        v: &View<'_>,
        extras: &Extras<'_, '_>,
    ) -> PyResult<Option<Py<PyAny>>>;
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
