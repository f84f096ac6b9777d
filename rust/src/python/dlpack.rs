//! Small tensors of an eager load, packed into shared blocks and handed to torch
//! through DLPack.
//!
//! Making a torch tensor through its Python API costs about a microsecond, plus a
//! `malloc` and its page faults per storage. For checkpoints of many small tensors
//! that is most of a load. Here a storage of at most [`SMALL_MAX`] bytes gets its
//! memory from a [`Block`]: one anonymous mapping of [`BLOCK_BYTES`], bump-allocated
//! on torch's 64-byte alignment. Each tensor still has its own storage of exactly
//! its record's size. It is made by `torch._C._from_dlpack` from a capsule built
//! here, at about half the cost of `torch.empty_like` plus `data_ptr()`. The
//! capsule's deleter holds an `Arc` of the block, so a block is unmapped when the
//! last tensor over it is freed, on whatever thread that happens; the deleter needs
//! neither the GIL nor Python.
//!
//! Like `torch.load(mmap=True)`'s storages, these storages are not resizable.
//!
//! The C structures are DLPack's legacy (pre-1.0) ABI, the one `torch._C._from_dlpack`
//! takes in a capsule named "dltensor": <https://dmlc.github.io/dlpack/latest/c_api.html>.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::MmapMut;
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;

/// Storages up to this size are packed into blocks.
pub const SMALL_MAX: usize = 64 << 10;
/// Size of one block's mapping. Only touched pages count towards resident memory;
/// a tensor kept alive keeps at most this much of a block. (Transparent huge pages
/// would fault faster, but with the usual `defrag=madvise` setting an allocation can
/// stall for milliseconds in compaction, so blocks take ordinary pages.)
pub const BLOCK_BYTES: usize = 16 << 20;
/// Dimensions a packed tensor may have.
pub const MAX_DIMS: usize = 8;
/// Dimensions whose shape and strides live inside `Managed` (more take an allocation).
const INLINE_DIMS: usize = 2;
const ALIGN: usize = 64;
const K_DL_CPU: i32 = 1;

const DLTENSOR: &CStr = c"dltensor";

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// A `DLManagedTensor` with the memory it points at: `shape` and `strides` point
/// into `inline` (or `heap`, past INLINE_DIMS dimensions), and `owner` (a packed
/// block, or the mapping of an `mmap=True` load) keeps `data` alive. `#[repr(C)]` with the managed tensor first, so a pointer to one is a
/// pointer to the other.
#[repr(C)]
struct Managed {
    tensor: DLManagedTensor,
    inline: [i64; 2 * INLINE_DIMS],
    heap: Option<Box<[i64]>>,
    _owner: Owner,
}

/// What keeps a DLPack tensor's memory alive: shared, freed with its last tensor.
pub type Owner = Arc<dyn std::any::Any + Send + Sync>;

/// The deleter torch calls (through its storage's deleter) when the storage dies.
unsafe extern "C" fn delete_managed(p: *mut DLManagedTensor) {
    // SAFETY: `p` is the pointer `capsule` made with `Box::into_raw` of a `Managed`
    // (whose first field is the managed tensor); DLPack calls the deleter exactly once,
    // and only when the capsule was consumed (else `capsule_destructor` calls it).
    drop(unsafe { Box::from_raw(p.cast::<Managed>()) });
}

/// Destructor of a capsule: a capsule torch consumed was renamed "used_dltensor" and
/// its tensor now belongs to torch; one never consumed still owns its `Managed`.
unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule being destroyed. PyCapsule_IsValid
    // checks its name without setting an error; a valid "dltensor" capsule of ours
    // holds a `Managed` pointer that nothing else frees.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr());
            if !p.is_null() {
                delete_managed(p.cast());
            }
        }
    }
}

/// One anonymous mapping that small storages are carved from.
pub struct Block {
    _map: MmapMut,
}

static BLOCKS_ALIVE: AtomicUsize = AtomicUsize::new(0);

impl Block {
    fn new(map: MmapMut) -> Block {
        BLOCKS_ALIVE.fetch_add(1, Ordering::Relaxed);
        Block { _map: map }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        BLOCKS_ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many packed blocks are mapped now, in this process (for tests: a block lives
/// exactly as long as some tensor over it).
#[pyfunction]
pub fn packed_blocks_alive() -> usize {
    BLOCKS_ALIVE.load(Ordering::Relaxed)
}

/// Bump allocation over blocks, for one load.
#[derive(Default)]
pub struct Packer {
    current: Option<(Arc<Block>, usize, usize)>, // (block, base address, used bytes)
    /// Every block used by this load, kept until its reads are done.
    pub blocks: Vec<Arc<Block>>,
}

impl Packer {
    /// `nbytes` (> 0, <= SMALL_MAX) of fresh, zeroed, 64-byte aligned memory: its
    /// address and the block that owns it.
    pub fn alloc(&mut self, nbytes: usize) -> std::io::Result<(usize, Arc<Block>)> {
        debug_assert!(nbytes > 0 && nbytes <= SMALL_MAX);
        let need = nbytes.div_ceil(ALIGN) * ALIGN;
        match &mut self.current {
            Some((block, base, used)) if *used + need <= BLOCK_BYTES => {
                let addr = *base + *used;
                *used += need;
                Ok((addr, block.clone()))
            }
            _ => {
                let mut map = MmapMut::map_anon(BLOCK_BYTES)?;
                let base = map.as_mut_ptr() as usize;
                let block = Arc::new(Block::new(map));
                self.blocks.push(block.clone());
                self.current = Some((block.clone(), base, need));
                Ok((base, block))
            }
        }
    }
}

/// A "dltensor" capsule for a CPU tensor of `dtype` with `size` and `stride` (in
/// elements) over the memory at `addr`, which `owner` keeps alive.
pub fn capsule<'py>(
    py: Python<'py>,
    addr: usize,
    dtype: DLDataType,
    size: &[i64],
    stride: &[i64],
    owner: Owner,
) -> PyResult<Bound<'py, PyAny>> {
    let ndim = size.len();
    if ndim > MAX_DIMS || stride.len() != ndim {
        return Err(PyValueError::new_err(
            "too many dimensions for a DLPack tensor",
        ));
    }
    let mut inline = [0i64; 2 * INLINE_DIMS];
    let heap = if ndim <= INLINE_DIMS {
        inline[..ndim].copy_from_slice(size);
        inline[ndim..2 * ndim].copy_from_slice(stride);
        None
    } else {
        Some(size.iter().chain(stride).copied().collect::<Box<[i64]>>())
    };
    let managed = Box::into_raw(Box::new(Managed {
        tensor: DLManagedTensor {
            dl_tensor: DLTensor {
                data: addr as *mut c_void,
                device: DLDevice {
                    device_type: K_DL_CPU,
                    device_id: 0,
                },
                ndim: ndim as i32,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_managed),
        },
        inline,
        heap,
        _owner: owner,
    }));
    // SAFETY: `managed` is a live, uniquely owned allocation. Its `inline` array (or
    // the `heap` slice it owns) holds 2 * ndim values, shape then strides; neither
    // moves until the Box is freed, so the pointers stay valid as long as the tensor.
    unsafe {
        let dims = match &mut (*managed).heap {
            Some(h) => h.as_mut_ptr(),
            None => std::ptr::addr_of_mut!((*managed).inline).cast::<i64>(),
        };
        (*managed).tensor.dl_tensor.shape = dims;
        (*managed).tensor.dl_tensor.strides = dims.add(ndim);
    }
    // SAFETY: PyCapsule_New takes a non-null pointer and a name with static lifetime;
    // on failure it returns NULL with an exception set and the Box is still ours.
    let raw =
        unsafe { ffi::PyCapsule_New(managed.cast(), DLTENSOR.as_ptr(), Some(capsule_destructor)) };
    if raw.is_null() {
        // SAFETY: the capsule was not created, so nothing else owns `managed`.
        unsafe { delete_managed(managed.cast()) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `raw` is a new (owned) reference.
    Ok(unsafe { Bound::from_owned_ptr(py, raw) })
}

/// The DLPack dtype of a "dltensor" capsule (from `torch.utils.dlpack.to_dlpack`), as
/// `(code, bits, lanes)`: how this torch spells each dtype in DLPack.
#[pyfunction]
pub fn dlpack_dtype(capsule: &Bound<'_, PyAny>) -> PyResult<(u8, u8, u16)> {
    // SAFETY: PyCapsule_IsValid accepts any object and checks type and name; a valid
    // "dltensor" capsule points to a DLManagedTensor, alive while the capsule is.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule.as_ptr(), DLTENSOR.as_ptr()) != 1 {
            return Err(PyValueError::new_err(
                "not an unconsumed 'dltensor' capsule",
            ));
        }
        let p = ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr())
            .cast::<DLManagedTensor>();
        if p.is_null() {
            return Err(PyErr::fetch(capsule.py()));
        }
        let d = (*p).dl_tensor.dtype;
        Ok((d.code, d.bits, d.lanes))
    }
}
