//! Memory that backs tensor storages: a private (copy-on-write) mapping of a whole
//! checkpoint for `mmap=True`, and 64-byte aligned owned buffers for decompressed
//! records.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

/// A whole file mapped copy-on-write: tensors can write to their pages without the
/// change reaching the file (torch's `mmap=True` semantics, `MAP_PRIVATE`).
pub struct MappedFile {
    map: MmapMut,
}

impl MappedFile {
    /// Maps `file` privately.
    ///
    /// # Safety
    /// The caller must accept the mmap contract: if another process truncates the file
    /// while it is mapped, touching the lost pages raises SIGBUS. Eager loads never map.
    pub unsafe fn map(file: &File) -> std::io::Result<Self> {
        // SAFETY: the mapping is private (copy-on-write), so our writes never reach the
        // file; the remaining hazard (truncation by another process) is the caller's, as
        // documented above.
        let map = unsafe { MmapOptions::new().map_copy(file)? };
        Ok(MappedFile { map })
    }

    /// Maps `file` shared (`MAP_SHARED`): writes to the mapping reach the file, as
    /// with `torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)`. The file
    /// must be open for reading and writing.
    ///
    /// # Safety
    /// As for [`MappedFile::map`]; and the caller asked for writes to reach the file.
    pub unsafe fn map_shared(file: &File) -> std::io::Result<Self> {
        // SAFETY: the caller accepts the mmap contract above and asked for a shared
        // mapping; the mapping stays valid for the life of `MmapMut`.
        let map = unsafe { MmapOptions::new().map_mut(file)? };
        Ok(MappedFile { map })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops this process's pages for `[offset, offset + len)` (the page-aligned
    /// interior): resident memory falls, and later reads fetch the file's bytes again
    /// from the page cache.
    ///
    /// # Safety
    /// No one may rely on *modifications* to that range: a private mapping's written
    /// pages are discarded, so the range reads as the file again. The loader calls
    /// this only for records already copied to a device, whose CPU views are gone.
    pub unsafe fn discard(&self, offset: usize, len: usize) {
        let page = 4096usize;
        let base = self.map.as_ptr() as usize;
        let start = (base + offset).div_ceil(page) * page;
        let end = (base + offset.saturating_add(len)).min(base + self.map.len()) / page * page;
        if end > start {
            // SAFETY: the range lies inside our mapping (clamped above); MADV_DONTNEED on
            // a private file mapping only resets pages to the file's contents, and the
            // caller guarantees nobody depends on the discarded modifications.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// An owned, zero-initialised, 64-byte aligned byte buffer (the alignment torch's CPU
/// allocator gives, so vectorised kernels see the same alignment as for torch memory).
pub struct AlignedBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared references only allow reads of plain bytes.
unsafe impl Sync for AlignedBuffer {}

const ALIGN: usize = 64;

impl AlignedBuffer {
    pub fn zeroed(len: usize) -> Option<Self> {
        if len == 0 {
            return Some(AlignedBuffer {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        let layout = Layout::from_size_align(len, ALIGN).ok()?;
        // SAFETY: layout has non-zero size (len > 0 checked above).
        let ptr = unsafe { alloc_zeroed(layout) };
        NonNull::new(ptr).map(|ptr| AlignedBuffer { ptr, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed at allocation) for as long
        // as self lives; a dangling ptr with len 0 is a valid empty slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout, freed once here.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, ALIGN),
                )
            };
        }
    }
}

/// Faults in `buf`'s pages for writing with one `madvise(MADV_POPULATE_WRITE)`
/// (Linux 5.14+) instead of one page fault per 4 KiB during the copy: a fresh 1 GiB
/// load spends about half as long in the kernel. Each reader thread prefaults its own
/// piece, so this runs in parallel. Transparent huge pages were measured too and
/// rejected: with THP defrag in `madvise` mode their direct compaction made loads
/// swing between 0.2 s and 2.5 s. Errors (older kernels) are ignored: it is a hint.
pub fn prefault_for_write(buf: &mut [u8]) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    if buf.len() < (1 << 20) {
        return;
    }
    let page = 4096usize;
    let start = (buf.as_mut_ptr() as usize).div_ceil(page) * page;
    let end = (buf.as_mut_ptr() as usize + buf.len()) / page * page;
    if end <= start {
        return;
    }
    // SAFETY: MADV_POPULATE_WRITE only populates page tables for a range inside memory
    // we hold a unique borrow of, as a write fault would; it never changes contents
    // (fresh pages read as zero, existing pages keep their bytes).
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_zeroed() {
        for n in [0usize, 1, 63, 64, 4097] {
            let mut b = AlignedBuffer::zeroed(n).unwrap();
            assert_eq!(b.len(), n);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            if n > 0 {
                assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
                b.as_mut_slice()[n - 1] = 7;
                assert_eq!(b.as_slice()[n - 1], 7);
            }
        }
    }
}
