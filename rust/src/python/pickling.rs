//! `SaveHelper`: the pickler hooks of a save, natively.
//!
//! Python's C pickler calls `persistent_id` for *every* object it meets and
//! `reducer_override` for every object that is not a builtin container, so these
//! two run hundreds of thousands of times for a big state dict. Natively they cost
//! a type check each. The reduction produced for a plain tensor is exactly what
//! `Tensor.__reduce_ex__` returns (`_rebuild_tensor_v2/v3` with the storage as a
//! persistent id); anything else returns `NotImplemented` so pickle (and torch's own
//! `__reduce_ex__`) handle it.

use std::collections::HashMap;

use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};

use super::writer::PyArchiveWriter;
use crate::pickle::op;

/// Stands for a storage inside a reduce tuple; `persistent_id` turns it into its id.
#[pyclass(module = "fastserial._fastserial", frozen)]
pub struct StorageRef {
    pid: Py<PyTuple>,
}

#[pymethods]
impl StorageRef {
    #[getter]
    fn pid(&self, py: Python<'_>) -> Py<PyTuple> {
        self.pid.clone_ref(py)
    }
}

/// A storage to write. Its address and size are read again when it is written: an
/// object pickled later in the same save may have resized or freed its memory.
struct SeenStorage {
    key: String,
    untyped: Py<PyAny>,
    on_cpu: bool,
}

#[pyclass(module = "fastserial._fastserial")]
pub struct SaveHelper {
    tensor_type: Py<PyAny>,
    ordered_dict: Py<PyAny>,
    strided: Py<PyAny>,
    untyped_cls: Py<PyAny>,
    empty_tuple: Py<PyTuple>,
    storage_tag: Py<PyString>,
    cpu_tag: Py<PyString>,
    /// dtype -> legacy storage class (FloatStorage, ...); dtypes missing here are v3.
    storage_class_by_dtype: Py<PyDict>,
    /// dtype -> element size
    itemsize: Py<PyDict>,
    rebuild_v2: Py<PyAny>,
    rebuild_v3: Py<PyAny>,
    get_metadata: Py<PyAny>,
    /// Python fallbacks: pid_for_storage(obj) for storages met directly,
    /// location_tag(untyped) for non-CPU storages, is_storage(obj) -> bool.
    py_pid_for_storage: Py<PyAny>,
    py_location_tag: Py<PyAny>,
    storage_types: Vec<Py<PyAny>>,
    typed_storage_cls: Py<PyAny>,
    refs: HashMap<usize, Py<StorageRef>>,
    storages: Vec<SeenStorage>,
    /// CPU storages are tagged 'cpu' without asking the registry (false when a user
    /// entry runs before the built-in cpu tagger).
    cpu_shortcut: bool,
    dtype_by_ptr: HashMap<usize, Py<PyAny>>,
}

impl SaveHelper {
    /// Records `dtype` as the type viewing the data at `ptr`; two types viewing the same
    /// data cannot be saved (torch refuses the same way).
    fn check_dtype(
        &mut self,
        py: Python<'_>,
        ptr: usize,
        dtype: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if ptr == 0 {
            return Ok(());
        }
        if let Some(seen) = self.dtype_by_ptr.get(&ptr) {
            if !seen.bind(py).eq(dtype)? {
                return Err(PyRuntimeError::new_err(
                    "Cannot save multiple tensors or storages that view the same data as different types",
                ));
            }
        } else {
            self.dtype_by_ptr.insert(ptr, dtype.clone().unbind());
        }
        Ok(())
    }

    /// The storage's location tag; `on_cpu` when the caller already knows it is 'cpu'.
    fn location(
        &self,
        py: Python<'_>,
        untyped: &Bound<'_, PyAny>,
        on_cpu: bool,
    ) -> PyResult<Py<PyAny>> {
        if on_cpu && self.cpu_shortcut {
            return Ok(self.cpu_tag.clone_ref(py).into_any());
        }
        self.py_location_tag.call1(py, (untyped,))
    }
}

#[pymethods]
impl SaveHelper {
    #[new]
    #[pyo3(signature = (torch_objs, fallbacks, cpu_shortcut=true))]
    fn new(
        torch_objs: &Bound<'_, PyDict>,
        fallbacks: &Bound<'_, PyDict>,
        cpu_shortcut: bool,
    ) -> PyResult<Self> {
        let py = torch_objs.py();
        let get = |d: &Bound<'_, PyDict>, k: &str| -> PyResult<Py<PyAny>> {
            d.get_item(k)?
                .map(|v| v.unbind())
                .ok_or_else(|| PyRuntimeError::new_err(format!("SaveHelper needs '{k}'")))
        };
        let storage_types: Vec<Py<PyAny>> = get(torch_objs, "storage_classes")?
            .bind(py)
            .try_iter()?
            .map(|c| c.map(|c| c.unbind()))
            .collect::<PyResult<_>>()?;
        Ok(SaveHelper {
            tensor_type: get(torch_objs, "Tensor")?,
            ordered_dict: get(torch_objs, "OrderedDict")?,
            strided: get(torch_objs, "strided")?,
            untyped_cls: get(torch_objs, "UntypedStorage")?,
            empty_tuple: PyTuple::empty(py).unbind(),
            storage_tag: PyString::new(py, "storage").unbind(),
            cpu_tag: PyString::new(py, "cpu").unbind(),
            storage_class_by_dtype: get(torch_objs, "storage_class_by_dtype")?.extract(py)?,
            itemsize: get(torch_objs, "itemsize")?.extract(py)?,
            rebuild_v2: get(torch_objs, "rebuild_v2")?,
            rebuild_v3: get(torch_objs, "rebuild_v3")?,
            get_metadata: get(torch_objs, "get_tensor_metadata")?,
            py_pid_for_storage: get(fallbacks, "pid_for_storage")?,
            py_location_tag: get(fallbacks, "location_tag")?,
            storage_types,
            typed_storage_cls: get(torch_objs, "TypedStorage")?,
            refs: HashMap::new(),
            storages: Vec::new(),
            dtype_by_ptr: HashMap::new(),
            cpu_shortcut,
        })
    }

    fn persistent_id(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if let Ok(r) = obj.downcast::<StorageRef>() {
            return Ok(r.get().pid.clone_ref(py).into_any());
        }
        let fallback = {
            let this = slf.borrow();
            let ty = obj.get_type();
            let is_storage = this.storage_types.iter().any(|t| ty.is(t.bind(py)))
                || obj.is_instance(this.typed_storage_cls.bind(py))?;
            if !is_storage {
                return Ok(py.None());
            }
            this.py_pid_for_storage.clone_ref(py)
        };
        // The borrow is released: the fallback calls back into key_for.
        fallback.call1(py, (obj,))
    }

    fn reducer_override(&mut self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let ty = obj.get_type();
        if ty.is(self.ordered_dict.bind(py)) {
            // An empty OrderedDict without attributes (every tensor's hooks): the
            // same GLOBAL + EMPTY_TUPLE + REDUCE that copyreg would produce, minus copyreg.
            let empty = obj.len()? == 0;
            let plain = match obj.getattr(intern!(py, "__dict__")) {
                Ok(d) => !d.is_truthy()?,
                Err(_) => true,
            };
            if empty && plain {
                return Ok(PyTuple::new(
                    py,
                    [
                        self.ordered_dict.clone_ref(py),
                        self.empty_tuple.clone_ref(py).into_any(),
                    ],
                )?
                .into_any()
                .unbind());
            }
            return Ok(py.NotImplemented());
        }
        if !ty.is(self.tensor_type.bind(py)) {
            return Ok(py.NotImplemented());
        }
        let Some(t) = self.plain_tensor(obj)? else {
            return Ok(py.NotImplemented());
        };
        let size = PyTuple::new(py, t.size.iter())?;
        let stride = PyTuple::new(py, t.stride.iter())?;
        let mut args: Vec<Py<PyAny>> = vec![
            t.storage.into_any(),
            t.offset.into_pyobject(py)?.into_any().unbind(),
            size.into_any().unbind(),
            stride.into_any().unbind(),
            PyBool::new(py, t.requires_grad)
                .to_owned()
                .into_any()
                .unbind(),
            self.ordered_dict.call0(py)?,
        ];
        if t.v3 {
            args.push(t.dtype.clone().unbind());
        }
        if let Some(metadata) = t.metadata {
            args.push(metadata);
        }
        let func = if t.v3 {
            &self.rebuild_v3
        } else {
            &self.rebuild_v2
        };
        Ok(PyTuple::new(
            py,
            [
                func.clone_ref(py),
                PyTuple::new(py, args)?.into_any().unbind(),
            ],
        )?
        .into_any()
        .unbind())
    }

    /// Registers a storage met directly (not through a tensor) and returns its key:
    /// the same key space as tensors' storages, so sharing is kept.
    fn key_for(
        &mut self,
        py: Python<'_>,
        untyped: &Bound<'_, PyAny>,
        dtype: &Bound<'_, PyAny>,
        pid_type: Py<PyAny>,
        numel: usize,
    ) -> PyResult<String> {
        let device_type = untyped
            .getattr(intern!(py, "device"))?
            .getattr(intern!(py, "type"))?;
        let device_type: String = device_type.extract()?;
        let address: usize = if device_type == "meta" {
            0
        } else {
            untyped.call_method0(intern!(py, "data_ptr"))?.extract()?
        };
        self.check_dtype(py, address, dtype)?;
        let cdata: usize = untyped.getattr(intern!(py, "_cdata"))?.extract()?;
        if let Some(r) = self.refs.get(&cdata) {
            return r.get().pid.bind(py).get_item(2)?.extract();
        }
        let key = self.storages.len().to_string();
        let location = self.location(py, untyped, false)?;
        let pid = PyTuple::new(
            py,
            [
                self.storage_tag.clone_ref(py).into_any(),
                pid_type,
                PyString::new(py, &key).into_any().unbind(),
                location,
                numel.into_pyobject(py)?.into_any().unbind(),
            ],
        )?
        .unbind();
        self.refs.insert(cdata, Py::new(py, StorageRef { pid })?);
        self.storages.push(SeenStorage {
            key: key.clone(),
            untyped: untyped.clone().unbind(),
            on_cpu: device_type == "cpu",
        });
        Ok(key)
    }

    /// The protocol-2 pickle of a state dict (str keys, plain tensors, an optional
    /// simple `_metadata`), written natively; `None` for any other object.
    fn fast_state_dict<'py>(
        &mut self,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
        self.state_dict_pickle(obj)
    }

    /// How to write the storages, in key order: runs of CPU storages as one list of
    /// `(record, untyped_storage)` for `write_storages`, and each device storage as
    /// `(record, untyped_storage)` to be staged through the CPU.
    fn write_plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let plan = PyList::empty(py);
        let mut run: Vec<(String, Py<PyAny>)> = Vec::new();
        for s in &self.storages {
            let record = format!("data/{}", s.key);
            if s.on_cpu {
                run.push((record, s.untyped.clone_ref(py)));
                continue;
            }
            if !run.is_empty() {
                plan.append(PyList::new(py, std::mem::take(&mut run))?)?;
            }
            plan.append((record, s.untyped.clone_ref(py)))?;
        }
        if !run.is_empty() {
            plan.append(PyList::new(py, run)?)?;
        }
        Ok(plan)
    }

    /// Writes CPU storages as records: `items` is `[(record, untyped_storage)]`, each
    /// a `torch.UntypedStorage` on the CPU. Each storage's address and size are read
    /// here, when it is written, so what lands in the file is the storage as it is
    /// now (what `torch.save` writes), never memory it has let go of.
    fn write_storages(
        &self,
        py: Python<'_>,
        writer: &Bound<'_, PyArchiveWriter>,
        items: Vec<(String, Bound<'_, PyAny>)>,
    ) -> PyResult<()> {
        let cls = self.untyped_cls.bind(py);
        let mut spans = Vec::with_capacity(items.len());
        for (record, untyped) in &items {
            if !untyped.get_type().is(cls) {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "storage for '{record}' is a {}, not a torch.UntypedStorage",
                    untyped.get_type().name()?
                )));
            }
            let device = untyped
                .getattr(intern!(py, "device"))?
                .getattr(intern!(py, "type"))?;
            if device.extract::<String>()? != "cpu" {
                return Err(PyRuntimeError::new_err(format!(
                    "storage for '{record}' is not on the CPU"
                )));
            }
            let nbytes: usize = untyped.call_method0(intern!(py, "nbytes"))?.extract()?;
            let address: usize = if nbytes == 0 {
                0
            } else {
                untyped.call_method0(intern!(py, "data_ptr"))?.extract()?
            };
            spans.push((record.clone(), address, nbytes));
        }
        // SAFETY: each span is the data_ptr()/nbytes() that torch reports for an exact
        // `torch.UntypedStorage` on the CPU, read just now with the GIL held and no
        // Python code run since; `items` holds a reference to every storage until the
        // write returns, so none is freed meanwhile. (Resizing one of them from another
        // thread during the write would be a data race in the caller, as it is for
        // torch.save.)
        unsafe { writer.borrow_mut().write_spans(py, spans) }
    }
}

/// What `Tensor.__reduce_ex__` puts in a plain tensor's reduction, read once.
struct PlainTensor<'py> {
    storage: Py<StorageRef>,
    v3: bool,
    dtype: Bound<'py, PyAny>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
    requires_grad: bool,
    /// `torch._C._get_tensor_metadata`, when not empty (conj/neg bits, ...).
    metadata: Option<Py<PyAny>>,
}

impl SaveHelper {
    /// The storage class and element count of the persistent id of a `dtype` tensor
    /// over `untyped`: the legacy class `storage_class` and nbytes / itemsize, or
    /// UntypedStorage and nbytes for dtypes without one (v3).
    fn pid_type(
        &self,
        untyped: &Bound<'_, PyAny>,
        dtype: &Bound<'_, PyAny>,
        storage_class: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Py<PyAny>, usize)> {
        let py = untyped.py();
        let nbytes: usize = untyped.call_method0(intern!(py, "nbytes"))?.extract()?;
        Ok(match storage_class {
            Some(cls) => {
                let size: usize = self
                    .itemsize
                    .bind(py)
                    .get_item(dtype)?
                    .map(|v| v.extract())
                    .transpose()?
                    .unwrap_or(1);
                (cls.clone().unbind(), nbytes / size.max(1))
            }
            None => (self.untyped_cls.clone_ref(py), nbytes),
        })
    }

    /// A plain tensor's reduction parts (registering its storage), or `None` when
    /// `obj` is not a plain dense tensor without Python state or hooks: the
    /// conditions of `Tensor.__reduce_ex__`'s own fast path.
    fn plain_tensor<'py>(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<Option<PlainTensor<'py>>> {
        let py = obj.py();
        // The plain-tensor conditions of Tensor.__reduce_ex__'s fast path.
        let layout_ok = obj
            .getattr(intern!(py, "layout"))?
            .is(self.strided.bind(py));
        let on_cpu = obj.getattr(intern!(py, "is_cpu"))?.is_truthy()?;
        if !layout_ok
            || obj.getattr(intern!(py, "is_quantized"))?.is_truthy()?
            || obj.getattr(intern!(py, "is_nested"))?.is_truthy()?
            || obj.getattr(intern!(py, "__dict__"))?.is_truthy()?
            || obj.getattr(intern!(py, "_backward_hooks"))?.is_truthy()?
            || !(on_cpu || obj.getattr(intern!(py, "is_cuda"))?.is_truthy()?)
        {
            return Ok(None);
        }
        // Before the storage is touched, as in `Tensor.__reduce_ex__`: torch's own
        // refusals (a ZeroTensor is not serializable) come from here, with its message.
        let metadata = self.get_metadata.call1(py, (obj,))?;
        let dtype = obj.getattr(intern!(py, "dtype"))?;
        let untyped = obj.call_method0(intern!(py, "untyped_storage"))?;
        let cdata: usize = untyped.getattr(intern!(py, "_cdata"))?.extract()?;
        let storage_class = self.storage_class_by_dtype.bind(py).get_item(&dtype)?;
        let v3 = storage_class.is_none();
        let existing = self.refs.get(&cdata).map(|r| r.clone_ref(py));
        let address: usize = untyped.call_method0(intern!(py, "data_ptr"))?.extract()?;
        self.check_dtype(py, address, &dtype)?;
        let r = match existing {
            Some(r) => {
                let pid = r.get().pid.bind(py);
                let same_type = match &storage_class {
                    Some(cls) => pid.get_item(1)?.is(cls),
                    None => pid.get_item(1)?.is(self.untyped_cls.bind(py)),
                };
                if same_type {
                    r
                } else {
                    // The storage met again under another dtype (torch.save allows that
                    // only for storages without data, checked above): torch writes a
                    // persistent id per view, with this dtype's storage class and numel
                    // under the same key and location.
                    let (cls, numel) = self.pid_type(&untyped, &dtype, storage_class.as_ref())?;
                    let pid = PyTuple::new(
                        py,
                        [
                            self.storage_tag.clone_ref(py).into_any(),
                            cls,
                            pid.get_item(2)?.unbind(),
                            pid.get_item(3)?.unbind(),
                            numel.into_pyobject(py)?.into_any().unbind(),
                        ],
                    )?
                    .unbind();
                    Py::new(py, StorageRef { pid })?
                }
            }
            None => {
                let key = PyString::new(py, &self.storages.len().to_string());
                let (cls, numel) = self.pid_type(&untyped, &dtype, storage_class.as_ref())?;
                let location = self.location(py, &untyped, on_cpu)?;
                let pid = PyTuple::new(
                    py,
                    [
                        self.storage_tag.clone_ref(py).into_any(),
                        cls,
                        key.clone().into_any().unbind(),
                        location,
                        numel.into_pyobject(py)?.into_any().unbind(),
                    ],
                )?
                .unbind();
                let r = Py::new(py, StorageRef { pid })?;
                self.refs.insert(cdata, r.clone_ref(py));
                self.storages.push(SeenStorage {
                    key: key.to_string(),
                    untyped: untyped.clone().unbind(),
                    on_cpu,
                });
                r
            }
        };
        Ok(Some(PlainTensor {
            storage: r,
            v3,
            dtype,
            offset: obj.call_method0(intern!(py, "storage_offset"))?.extract()?,
            size: obj.call_method0(intern!(py, "size"))?.extract()?,
            stride: obj.call_method0(intern!(py, "stride"))?.extract()?,
            requires_grad: obj.getattr(intern!(py, "requires_grad"))?.is_truthy()?,
            metadata: if metadata.bind(py).is_truthy()? {
                Some(metadata)
            } else {
                None
            },
        }))
    }
}

/// A small protocol-2 pickle writer: memoized globals and constants, everything else
/// written fresh (the unpickler does not need the pickler's full memo).
#[derive(Default)]
struct PickleOut {
    buf: Vec<u8>,
    memo: HashMap<String, u32>,
    /// Tensors already written, by object address: a repeat is fetched from the memo,
    /// so the same object twice loads as one object (as pickle's own memo does).
    objects: HashMap<usize, u32>,
    next: u32,
}

/// `pickle` writes SETITEMS/APPENDS in batches of this many items.
const BATCH: usize = 1000;

impl PickleOut {
    fn put(&mut self) -> u32 {
        let i = self.next;
        if i < 256 {
            self.buf.extend_from_slice(&[op::BINPUT, i as u8]);
        } else {
            self.buf.push(op::LONG_BINPUT);
            self.buf.extend_from_slice(&i.to_le_bytes());
        }
        self.next += 1;
        i
    }
    fn get(&mut self, i: u32) {
        if i < 256 {
            self.buf.extend_from_slice(&[op::BINGET, i as u8]);
        } else {
            self.buf.push(op::LONG_BINGET);
            self.buf.extend_from_slice(&i.to_le_bytes());
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        let key = format!("g{module}\n{name}");
        if let Some(&i) = self.memo.get(&key) {
            return self.get(i);
        }
        self.buf.push(op::GLOBAL);
        self.buf.extend_from_slice(module.as_bytes());
        self.buf.push(b'\n');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b'\n');
        let i = self.put();
        self.memo.insert(key, i);
    }
    fn string(&mut self, s: &str) {
        self.buf.push(op::BINUNICODE);
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }
    /// A string that recurs in every tensor ('storage', 'cpu'): written once, then fetched.
    fn constant(&mut self, s: &str) {
        let key = format!("s{s}");
        if let Some(&i) = self.memo.get(&key) {
            return self.get(i);
        }
        self.string(s);
        let i = self.put();
        self.memo.insert(key, i);
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.buf.extend_from_slice(&[op::BININT1, v as u8]);
        } else if (0..65536).contains(&v) {
            self.buf.push(op::BININT2);
            self.buf.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.buf.push(op::BININT);
            self.buf.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: the shortest two's-complement little-endian encoding.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.buf.extend_from_slice(&[op::LONG1, n as u8]);
            self.buf.extend_from_slice(&bytes[..n]);
        }
    }
    fn int_tuple(&mut self, items: &[i64]) {
        match items.len() {
            0 => return self.buf.push(op::EMPTY_TUPLE),
            1..=3 => {}
            _ => self.buf.push(op::MARK),
        }
        for &v in items {
            self.int(v);
        }
        self.buf.push(match items.len() {
            1 => op::TUPLE1,
            2 => op::TUPLE2,
            3 => op::TUPLE3,
            _ => op::TUPLE,
        });
    }
}

impl SaveHelper {
    /// (module, qualname) of a class or other global, as pickle would import it.
    fn global_name(obj: &Bound<'_, PyAny>) -> PyResult<(String, String)> {
        let py = obj.py();
        Ok((
            obj.getattr(intern!(py, "__module__"))?.extract()?,
            obj.getattr(intern!(py, "__qualname__"))?.extract()?,
        ))
    }

    /// Writes a plain tensor's reduction; false when `obj` is not a plain tensor.
    fn write_tensor(&mut self, out: &mut PickleOut, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
        let py = obj.py();
        if let Some(&i) = out.objects.get(&(obj.as_ptr() as usize)) {
            out.get(i);
            return Ok(true);
        }
        let Some(t) = self.plain_tensor(obj)? else {
            return Ok(false);
        };
        if t.metadata.is_some() {
            return Ok(false); // tensor metadata (conj/neg bits, ...): the general pickler
        }
        let func = if t.v3 {
            &self.rebuild_v3
        } else {
            &self.rebuild_v2
        };
        let (module, name) = Self::global_name(func.bind(py))?;
        out.global(&module, &name);
        out.buf.push(op::MARK);
        // The storage as a persistent id: ('storage', type, key, location, numel).
        let pid = t.storage.get().pid.bind(py);
        out.buf.push(op::MARK);
        out.constant("storage");
        let (cm, cn) = Self::global_name(&pid.get_item(1)?)?;
        out.global(&cm, &cn);
        out.string(pid.get_item(2)?.extract::<&str>()?);
        let location: String = pid.get_item(3)?.extract()?;
        out.constant(&location);
        out.int(pid.get_item(4)?.extract()?);
        out.buf.push(op::TUPLE);
        out.buf.push(op::BINPERSID);
        out.int(t.offset);
        out.int_tuple(&t.size);
        out.int_tuple(&t.stride);
        out.buf.push(if t.requires_grad {
            op::NEWTRUE
        } else {
            op::NEWFALSE
        });
        out.global("collections", "OrderedDict");
        out.buf.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
        if t.v3 {
            // A dtype pickles as the global torch.<name>.
            let dtype: String = t.dtype.str()?.extract()?;
            let Some(name) = dtype.strip_prefix("torch.") else {
                return Ok(false);
            };
            out.global("torch", name);
        }
        out.buf.extend_from_slice(&[op::TUPLE, op::REDUCE]);
        // The dict holds every tensor for the whole call, so addresses stay unique.
        let i = out.put();
        out.objects.insert(obj.as_ptr() as usize, i);
        Ok(true)
    }

    /// Writes a simple value (None, bool, int, float, str, and lists, tuples, dicts and
    /// OrderedDicts of those): what `_metadata` holds. False for anything else.
    fn write_simple(
        &self,
        out: &mut PickleOut,
        obj: &Bound<'_, PyAny>,
        depth: usize,
    ) -> PyResult<bool> {
        use pyo3::types::{PyBool, PyFloat, PyInt, PyList};
        let py = obj.py();
        if depth > 32 {
            return Ok(false);
        }
        if obj.is_none() {
            out.buf.push(op::NONE);
        } else if let Ok(b) = obj.downcast_exact::<PyBool>() {
            out.buf.push(if b.is_true() {
                op::NEWTRUE
            } else {
                op::NEWFALSE
            });
        } else if obj.downcast_exact::<PyInt>().is_ok() {
            let Ok(v) = obj.extract::<i64>() else {
                return Ok(false);
            };
            out.int(v);
        } else if let Ok(f) = obj.downcast_exact::<PyFloat>() {
            out.buf.push(op::BINFLOAT);
            out.buf.extend_from_slice(&f.value().to_be_bytes());
        } else if let Ok(s) = obj.downcast_exact::<PyString>() {
            out.string(s.to_str()?);
        } else if let Ok(t) = obj.downcast_exact::<PyTuple>() {
            if t.is_empty() {
                out.buf.push(op::EMPTY_TUPLE);
                return Ok(true);
            }
            out.buf.push(op::MARK);
            for item in t.iter() {
                if !self.write_simple(out, &item, depth + 1)? {
                    return Ok(false);
                }
            }
            out.buf.push(op::TUPLE);
        } else if let Ok(l) = obj.downcast_exact::<PyList>() {
            out.buf.push(op::EMPTY_LIST);
            out.put();
            let items: Vec<_> = l.iter().collect();
            for chunk in items.chunks(BATCH) {
                out.buf.push(op::MARK);
                for item in chunk {
                    if !self.write_simple(out, item, depth + 1)? {
                        return Ok(false);
                    }
                }
                out.buf.push(op::APPENDS);
            }
        } else if let Ok(d) = obj.downcast_exact::<PyDict>() {
            out.buf.push(op::EMPTY_DICT);
            out.put();
            if !self.write_items(out, d, depth)? {
                return Ok(false);
            }
        } else if obj.get_type().is(self.ordered_dict.bind(py)) {
            let has_attrs = obj.getattr(intern!(py, "__dict__"))?.is_truthy()?;
            if has_attrs {
                return Ok(false);
            }
            out.global("collections", "OrderedDict");
            out.buf.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
            out.put();
            let d = obj.downcast::<PyDict>()?;
            if !self.write_items(out, d, depth)? {
                return Ok(false);
            }
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Writes a mapping's str keys and simple values in SETITEMS batches.
    fn write_items(
        &self,
        out: &mut PickleOut,
        d: &Bound<'_, PyDict>,
        depth: usize,
    ) -> PyResult<bool> {
        let items: Vec<_> = d.iter().collect();
        for chunk in items.chunks(BATCH) {
            out.buf.push(op::MARK);
            for (k, v) in chunk {
                let Ok(k) = k.downcast_exact::<PyString>() else {
                    return Ok(false);
                };
                out.string(k.to_str()?);
                if !self.write_simple(out, v, depth + 1)? {
                    return Ok(false);
                }
            }
            out.buf.push(op::SETITEMS);
        }
        Ok(true)
    }
}

impl SaveHelper {
    /// The protocol-2 pickle of a state dict — a dict or OrderedDict (with a simple
    /// `_metadata`) mapping str to plain tensors — written natively, with the same
    /// opcodes `pickle` produces for it. `None` when `obj` has any other shape; the
    /// caller then runs the general pickler with this helper's hooks.
    fn state_dict_pickle<'py>(
        &mut self,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
        let py = obj.py();
        let is_od = obj.get_type().is(self.ordered_dict.bind(py));
        let Ok(d) = obj.downcast::<PyDict>() else {
            return Ok(None);
        };
        if !is_od && obj.downcast_exact::<PyDict>().is_err() {
            return Ok(None);
        }
        // Everything must qualify before any storage is registered.
        let mut state: Option<Bound<'py, PyAny>> = None;
        if is_od {
            let attrs = obj.getattr(intern!(py, "__dict__"))?;
            if attrs.is_truthy()? {
                let attrs = attrs.downcast_into::<PyDict>()?;
                if attrs.len() != 1 || attrs.get_item("_metadata")?.is_none() {
                    return Ok(None);
                }
                state = Some(attrs.into_any());
            }
        }
        for (k, v) in d.iter() {
            if k.downcast_exact::<PyString>().is_err()
                || !v.get_type().is(self.tensor_type.bind(py))
            {
                return Ok(None);
            }
        }
        let mut out = PickleOut::default();
        out.buf.extend_from_slice(&[op::PROTO, 2]);
        if is_od {
            out.global("collections", "OrderedDict");
            out.buf.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
        } else {
            out.buf.push(op::EMPTY_DICT);
        }
        out.put();
        let items: Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)> = d.iter().collect();
        for chunk in items.chunks(BATCH) {
            out.buf.push(op::MARK);
            for (k, v) in chunk {
                out.string(k.downcast::<PyString>()?.to_str()?);
                if !self.write_tensor(&mut out, v)? {
                    return Ok(None);
                }
            }
            out.buf.push(op::SETITEMS);
        }
        if let Some(state) = state {
            // OrderedDict.__reduce__'s state: vars(od) = {'_metadata': ...}, then BUILD.
            if !self.write_simple(&mut out, &state, 0)? {
                return Ok(None);
            }
            out.buf.push(op::BUILD);
        }
        out.buf.push(op::STOP);
        Ok(Some(pyo3::types::PyBytes::new(py, &out.buf)))
    }
}
