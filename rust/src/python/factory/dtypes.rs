//! What a load knows of the dtypes and storage classes its pickle names, each
//! looked up in Python once.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::python::dlpack::DLDataType;

/// What a rebuild needs to know of a dtype.
#[derive(Clone, Copy)]
pub(super) struct DtypeInfo {
    pub(super) itemsize: usize,
    /// Element size to byte-swap by (complex numbers swap per component).
    pub(super) swap_size: usize,
    /// How torch spells the dtype in DLPack, when small tensors of it are packed.
    pub(super) dl: Option<DLDataType>,
    /// Whether a packed tensor has shown that `dl` comes back as this dtype.
    pub(super) dl_checked: bool,
}

pub(super) struct Dtypes {
    /// dtype -> its sizes (None: not one this factory builds). Holding each key keeps
    /// its identity unique for the factory's life.
    dtypes: Vec<(Py<PyAny>, Option<DtypeInfo>)>,
    /// storage class -> the dtype it stands for (None: not a storage class).
    storage_types: Vec<(Py<PyAny>, Option<Py<PyAny>>)>,
    /// dtype -> (itemsize, swap element size)
    sizes: Py<PyDict>,
    /// dtype -> (code, bits), when small tensors are packed (`dlpack.rs`).
    dlpack_codes: Option<Py<PyDict>>,
    /// What the pickle's UntypedStorage global resolved to, and the dtype it stands for.
    untyped_cls: Py<PyAny>,
    uint8: Py<PyAny>,
}

impl Dtypes {
    pub(super) fn new(
        sizes: Py<PyDict>,
        dlpack_codes: Option<Py<PyDict>>,
        untyped_cls: Py<PyAny>,
        uint8: Py<PyAny>,
    ) -> Self {
        Dtypes {
            dtypes: Vec::new(),
            storage_types: Vec::new(),
            sizes,
            dlpack_codes,
            untyped_cls,
            uint8,
        }
    }

    pub(super) fn dtype_info(
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

    /// The entry of a dtype looked up before, to record what a packed tensor showed
    /// of its DLPack spelling.
    pub(super) fn info_mut(&mut self, dtype: &Bound<'_, PyAny>) -> Option<&mut DtypeInfo> {
        let entry = self.dtypes.iter_mut().find(|d| d.0.is(dtype));
        entry.and_then(|e| e.1.as_mut())
    }

    /// The dtype a storage class in a persistent id stands for.
    pub(super) fn storage_dtype(
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
}
