//! Coverage-guided fuzzing of the pickle scanner (`pickle::scan`), the pure-Rust part
//! of unpickling: it lists a pickle's globals for the weights-only loader, `inspect`
//! and `get_unsafe_globals_in_checkpoint`, and bounds lengths and memo indices before
//! any unpickler allocates for them.
//!
//! Arbitrary bytes must give `Ok` or `Err`, never a panic, in time and memory bounded
//! by the input (libFuzzer's `-timeout` and `-rss_limit_mb` / `-malloc_limit_mb` catch
//! the rest). When the scan succeeds, what it reports must be consistent:
//!
//! * `end` lies inside the input, just past a STOP opcode byte;
//! * the scan depends only on the bytes up to `end` (and on whether a FRAME that
//!   runs past the STOP fits in the input, as in Python's unpickler): scanning
//!   `data` followed by more bytes reports the same, and `data[..end]` alone too, or
//!   fails on such a FRAME;
//! * globals are listed without repeats; `memo_read` has no bytes past the last key set.
//!
//! Seeds: the `data.pkl` records of tests/data/*.pt and pickles written by Python
//! (`python3 fuzz/make_corpus.py`). Run: `cargo +nightly fuzz run pickle_scanner`.
#![no_main]

use _fastserial::pickle;
use libfuzzer_sys::fuzz_target;

fn same(a: &pickle::PickleScan, b: &pickle::PickleScan) -> bool {
    a.globals == b.globals
        && a.persistent_ids == b.persistent_ids
        && a.builds == b.builds
        && a.persistent_id_reused == b.persistent_id_reused
        && a.protocol == b.protocol
        && a.unsafe_opcodes == b.unsafe_opcodes
        && a.end == b.end
        && a.memo_read == b.memo_read
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = pickle::scan(data) else {
        return;
    };
    assert!(
        s.end >= 1 && s.end <= data.len(),
        "end {} of {}",
        s.end,
        data.len()
    );
    assert_eq!(data[s.end - 1], b'.', "end {} is not past a STOP", s.end);
    let mut seen = std::collections::HashSet::new();
    for g in &s.globals {
        assert!(seen.insert(g), "global {g:?} listed twice");
    }
    if let Some(last) = s.memo_read.last() {
        assert_ne!(*last, 0, "memo_read ends with an empty byte");
    }
    let head = &data[..s.end];
    match pickle::scan(head) {
        Ok(again) => assert!(same(&s, &again), "scan differs without the trailing bytes"),
        // A FRAME may run past the STOP (Python's unpickler reads the whole frame
        // first, so the bytes must be there): the only way the shorter input may fail.
        Err(e) => assert!(e.to_string().contains("FRAME of"), "{e}"),
    }
    let mut longer = data.to_vec();
    longer.extend_from_slice(b"\x00garbage(((.");
    let third = pickle::scan(&longer).expect("trailing bytes do not matter");
    assert!(same(&s, &third), "scan differs with other trailing bytes");
});
