//! The reads of a load: records queued until `finish` reads them all at once (GIL
//! released, several threads), and small records prefetched into packed blocks on a
//! worker thread while the pickle runs.

use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;

use crate::container::reader::ReadJob;
use crate::python::dlpack::{self, Block, Packer};
use crate::python::errors::{at, CheckpointError};
use crate::python::num_threads;
use crate::python::reader::PyArchive;

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
/// (`Reads::start_prefetch`).
struct Prefetch {
    /// record -> (address, index in `packer.blocks`) of its bytes, until a tensor
    /// takes them.
    slots: Vec<Option<(usize, usize)>>,
    /// (record, address, nbytes, block) of each prefetched record a tensor took.
    taken: Vec<(usize, usize, usize, Arc<Block>)>,
    worker: std::thread::JoinHandle<PrefetchResult>,
}

/// Memory of a packed block for one small record (`Reads::small_range`).
pub(super) struct SmallRange {
    pub(super) addr: usize,
    pub(super) block: Arc<Block>,
    /// The prefetch worker reads it (else its read is to be queued).
    prefetched: bool,
}

pub(super) struct Reads {
    archive: Py<PyArchive>,
    verify: bool,
    /// Reads queued until `finish`, each with what keeps its memory alive.
    jobs: Vec<Fill>,
    packer: Packer,
    prefetch: Option<Prefetch>,
}

impl Drop for Reads {
    /// A factory dropped unfinished (an error, or a pickle handed to Python's
    /// unpickler) waits for its worker: no write may land after the load is over.
    fn drop(&mut self) {
        if let Some(pf) = self.prefetch.take() {
            let _ = pf.worker.join();
        }
    }
}

impl Reads {
    pub(super) fn new(archive: Py<PyArchive>, verify: bool) -> Self {
        Reads {
            archive,
            verify,
            jobs: Vec::new(),
            packer: Packer::default(),
            prefetch: None,
        }
    }

    /// Queues the read of `record` into `storage`'s memory at `addr` (`nbytes` long).
    pub(super) fn queue_storage(
        &mut self,
        record: usize,
        addr: usize,
        nbytes: usize,
        swap: usize,
        storage: Py<PyAny>,
    ) {
        self.jobs.push(Fill {
            record,
            addr,
            nbytes,
            swap,
            dest: Dest::Storage(storage),
        });
    }

    /// Memory of a packed block for `record` (`nbytes` long): the bytes the prefetch
    /// worker reads, when it reads this record and no swap is needed, else a fresh
    /// range. A prefetched range is handed out once.
    pub(super) fn small_range(
        &mut self,
        record: usize,
        nbytes: usize,
        swap: usize,
    ) -> PyResult<SmallRange> {
        let prefetched = match &mut self.prefetch {
            Some(pf) if swap == 0 => pf.slots.get_mut(record).and_then(Option::take),
            _ => None,
        };
        let (addr, block) = match prefetched {
            Some((addr, block)) => (addr, self.packer.blocks[block].clone()),
            None => self.packer.alloc(nbytes)?,
        };
        Ok(SmallRange {
            addr,
            block,
            prefetched: prefetched.is_some(),
        })
    }

    /// A tensor took `range` (from `small_range` with the same arguments): its read
    /// is queued, or, when the worker reads it, waited for by `finish`.
    pub(super) fn queue_small(
        &mut self,
        record: usize,
        nbytes: usize,
        swap: usize,
        range: SmallRange,
    ) {
        let SmallRange {
            addr,
            block,
            prefetched,
        } = range;
        match (&mut self.prefetch, prefetched) {
            (Some(pf), true) => pf.taken.push((record, addr, nbytes, block)),
            _ => self.jobs.push(Fill {
                record,
                addr,
                nbytes,
                swap,
                dest: Dest::Block { _alive: block },
            }),
        }
    }

    /// Starts reading every small `data/` record into packed blocks on a worker
    /// thread, so the reads overlap the pickle's run on this one. A record no tensor
    /// takes was read for nothing; its memory goes with the blocks.
    /// `storages_named` is how many persistent ids the pickle holds (the scan's
    /// count): a file with more small records than that has records no tensor
    /// can use, and is read on demand instead, so the work stays proportional to
    /// what the pickle uses.
    pub(super) fn start_prefetch(&mut self, py: Python<'_>, storages_named: usize) {
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
                            // this thread holds until the reads end, so the memory
                            // stays mapped and this load's own. The tensors made over
                            // it reach the caller only after `finish` has joined this
                            // thread, and a factory dropped unfinished joins it
                            // (`Reads`' `Drop`). Only code the pickle runs could touch
                            // those tensors meanwhile (inert globals read no data; a
                            // SETITEM on a tensor would write it): at worst a race on
                            // values inside this block, never on memory outside it.
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

    /// Reads every queued storage (GIL released, several threads) and lets go of
    /// what kept their memory alive. A storage the pickle resized or swapped since
    /// its read was queued is refused, never written.
    pub(super) fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
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
        let archive = self.archive.get();
        for job in &jobs {
            if let Dest::Storage(storage) = &job.dest {
                let s = storage.bind(py);
                let n: usize = s.call_method0(intern!(py, "nbytes"))?.extract()?;
                let addr: usize = s.call_method0(intern!(py, "data_ptr"))?.extract()?;
                if n != job.nbytes || addr != job.addr {
                    let name = &archive.archive.records()[job.record].name;
                    return Err(CheckpointError::new_err(format!(
                        "{}: record '{name}': the pickle changed this storage (now {n} bytes) \
                         before its {} bytes were read; refusing to write into it",
                        archive.file, job.nbytes
                    )));
                }
            }
        }
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
