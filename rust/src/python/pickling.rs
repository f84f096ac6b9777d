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
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

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

/// A storage to write: where its bytes are, captured when the pickler met it.
struct SeenStorage {
    key: String,
    untyped: Py<PyAny>,
    address: usize,
    nbytes: usize,
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
    fn check_dtype(&mut self, py: Python<'_>, ptr: usize, dtype: &Bound<'_, PyAny>) -> PyResult<()> {
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
    fn location(&self, py: Python<'_>, untyped: &Bound<'_, PyAny>, on_cpu: bool) -> PyResult<Py<PyAny>> {
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
    fn new(torch_objs: &Bound<'_, PyDict>, fallbacks: &Bound<'_, PyDict>, cpu_shortcut: bool) -> PyResult<Self> {
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
                return Ok(PyTuple::new(py, [self.ordered_dict.clone_ref(py), self.empty_tuple.clone_ref(py).into_any()])?.into_any().unbind());
            }
            return Ok(py.NotImplemented());
        }
        if !ty.is(self.tensor_type.bind(py)) {
            return Ok(py.NotImplemented());
        }
        // The plain-tensor conditions of Tensor.__reduce_ex__'s fast path.
        let layout_ok = obj.getattr(intern!(py, "layout"))?.is(self.strided.bind(py));
        let on_cpu = obj.getattr(intern!(py, "is_cpu"))?.is_truthy()?;
        if !layout_ok
            || obj.getattr(intern!(py, "is_quantized"))?.is_truthy()?
            || obj.getattr(intern!(py, "is_nested"))?.is_truthy()?
            || obj.getattr(intern!(py, "__dict__"))?.is_truthy()?
            || obj.getattr(intern!(py, "_backward_hooks"))?.is_truthy()?
            || !(on_cpu || obj.getattr(intern!(py, "is_cuda"))?.is_truthy()?)
        {
            return Ok(py.NotImplemented());
        }
        let dtype = obj.getattr(intern!(py, "dtype"))?;
        let untyped = obj.call_method0(intern!(py, "untyped_storage"))?;
        let cdata: usize = untyped.getattr(intern!(py, "_cdata"))?.extract()?;
        let storage_class = self.storage_class_by_dtype.bind(py).get_item(&dtype)?;
        let v3 = storage_class.is_none();
        let existing = self.refs.get(&cdata).map(|r| r.clone_ref(py));
        let address: usize = untyped.call_method0(intern!(py, "data_ptr"))?.extract()?;
        self.check_dtype(py, address, &dtype)?;
        let r = match existing {
            Some(r) => r,
            None => {
                let key = PyString::new(py, &self.storages.len().to_string());
                let nbytes: usize = untyped.call_method0(intern!(py, "nbytes"))?.extract()?;
                let (cls, numel) = match &storage_class {
                    Some(cls) => {
                        let size: usize = self.itemsize.bind(py).get_item(&dtype)?.map(|v| v.extract()).transpose()?.unwrap_or(1);
                        (cls.clone().unbind(), nbytes / size.max(1))
                    }
                    None => (self.untyped_cls.clone_ref(py), nbytes),
                };
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
                    address,
                    nbytes,
                    on_cpu,
                });
                r
            }
        };
        let hooks = self.ordered_dict.call0(py)?;
        let mut args: Vec<Py<PyAny>> = vec![
            r.into_any(),
            obj.call_method0(intern!(py, "storage_offset"))?.unbind(),
            PyTuple::new(py, obj.call_method0(intern!(py, "size"))?.try_iter()?.collect::<PyResult<Vec<_>>>()?)?.into_any().unbind(),
            obj.call_method0(intern!(py, "stride"))?.unbind(),
            obj.getattr(intern!(py, "requires_grad"))?.unbind(),
            hooks,
        ];
        if v3 {
            args.push(dtype.clone().unbind());
        }
        let metadata = self.get_metadata.call1(py, (obj,))?;
        if metadata.bind(py).is_truthy()? {
            args.push(metadata);
        }
        let func = if v3 { &self.rebuild_v3 } else { &self.rebuild_v2 };
        Ok(PyTuple::new(py, [func.clone_ref(py), PyTuple::new(py, args)?.into_any().unbind()])?.into_any().unbind())
    }

    /// Registers a storage met directly (not through a tensor) and returns its key:
    /// the same key space as tensors' storages, so sharing is kept.
    fn key_for(&mut self, py: Python<'_>, untyped: &Bound<'_, PyAny>, dtype: &Bound<'_, PyAny>, pid_type: Py<PyAny>, numel: usize) -> PyResult<String> {
        let device_type = untyped.getattr(intern!(py, "device"))?.getattr(intern!(py, "type"))?;
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
        let nbytes: usize = untyped.call_method0(intern!(py, "nbytes"))?.extract()?;
        self.storages.push(SeenStorage {
            key: key.clone(),
            untyped: untyped.clone().unbind(),
            address,
            nbytes,
            on_cpu: device_type == "cpu",
        });
        Ok(key)
    }

    /// How to write the storages, in key order: runs of CPU storages as one list of
    /// `(record, address, nbytes)` for `ArchiveWriter.write_storages`, and each device
    /// storage as `(record, untyped_storage)` to be staged through the CPU.
    fn write_plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let plan = PyList::empty(py);
        let mut run: Vec<(String, usize, usize)> = Vec::new();
        for s in &self.storages {
            let record = format!("data/{}", s.key);
            if s.on_cpu {
                run.push((record, s.address, s.nbytes));
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
}
