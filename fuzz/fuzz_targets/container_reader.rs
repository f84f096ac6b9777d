//! Coverage-guided fuzzing of the container reader and the pickle scanner.
//!
//! Arbitrary bytes are opened as an in-memory archive and every record is read every
//! way the Python binding reads it: whole (`read`, CRC on and off), checked
//! (`verify_record`), and into caller buffers on several threads with byte swapping
//! (`read_many_into`). The same bytes, and every `data.pkl` found, go through
//! `pickle::scan`. Errors are expected; a panic, an abort or a sanitizer report is
//! a bug. Run: `cargo +nightly fuzz run container_reader` (see fuzz/README.md).
#![no_main]

use _fastserial::{pickle, Archive, MemorySource, ReadJob};
use libfuzzer_sys::fuzz_target;

/// Buffers this target allocates itself stay below this; the reader must bound its
/// own allocations (`read`) whatever the archive declares.
const BUFFER_LIMIT: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = pickle::scan(data);
    let Ok(archive) = Archive::open(Box::new(MemorySource(data.to_vec()))) else {
        return;
    };
    let _ = archive.prefix();
    let _ = archive.names();
    let _ = archive.require("data.pkl");
    let records = archive.records();
    for rec in records {
        let _ = archive.stored_slice(rec);
        let _ = archive.verify_record(rec);
        if let Ok(bytes) = archive.read(rec, true) {
            if rec.name.ends_with("data.pkl") {
                let _ = pickle::scan(&bytes);
            }
        }
        let _ = archive.read(rec, false);
    }
    let mut bufs: Vec<Vec<u8>> = records
        .iter()
        .map(|r| {
            if r.size <= BUFFER_LIMIT {
                vec![0u8; r.size as usize]
            } else {
                Vec::new()
            }
        })
        .collect();
    for (verify, swap) in [(false, 0usize), (true, 4), (false, 2)] {
        let jobs: Vec<ReadJob<'_>> = records
            .iter()
            .zip(bufs.iter_mut())
            .filter(|(r, _)| r.size <= BUFFER_LIMIT)
            .map(|(record, dst)| ReadJob {
                record,
                dst: &mut dst[..],
                swap,
            })
            .collect();
        let _ = archive.read_many_into(jobs, 2, verify);
    }
});
