//! Deterministic fuzzing of the container reader and the pickle scanner, runnable
//! with plain `cargo test` (no nightly, no cargo-fuzz): real checkpoints from
//! `tests/data/` and archives built here are mutated with a seeded xorshift RNG
//! (bit flips, overwritten ranges, interesting integers in header fields, truncation,
//! insertion, deletion), and every mutant is opened and read every way the binding
//! reads it. Any panic fails the test and names the fixture, seed and mutation.
//!
//! The coverage-guided version is `fuzz/fuzz_targets/container_reader.rs`
//! (`cargo +nightly fuzz run container_reader`, see `fuzz/README.md`). For longer
//! runs here: `FASTSERIAL_FUZZ_ITERATIONS=200000 cargo test --release --test container_fuzz`.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use _fastserial::{pickle, Archive, ArchiveWriter, FileSource, MemorySource, ReadJob};

mod common;
use common::{finish_zip, u16le, u32le};

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

fn fixture_files() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(data_dir())
        .expect("tests/data exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pt"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// A small checkpoint-shaped archive written by our own writer.
fn written_archive() -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new(), "ckpt");
    // pickle.dumps(collections.OrderedDict(), protocol=2)
    w.write_record(
        "data.pkl",
        b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01.",
    )
    .unwrap();
    w.write_record(".format_version", b"1").unwrap();
    w.write_record("byteorder", b"little").unwrap();
    let floats: Vec<u8> = (0..300u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.write_record("data/0", &floats).unwrap();
    w.write_record("data/1", b"").unwrap();
    w.write_record("version", b"3\n").unwrap();
    w.finish().unwrap()
}

/// A hand-built zip with one DEFLATE record (torch never writes these, but the
/// reader accepts them, so the inflate path must be as robust as the stored one).
fn deflated_archive() -> Vec<u8> {
    let plain: Vec<u8> = (0..4000u32).map(|i| (i % 7) as u8).collect();
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).unwrap();
    let packed = enc.finish().unwrap();
    let records: Vec<(&str, u16, Vec<u8>, Vec<u8>)> = vec![
        (
            "arc/data.pkl",
            0,
            b"\x80\x02N.".to_vec(),
            b"\x80\x02N.".to_vec(),
        ),
        ("arc/data/0", 8, packed, plain),
    ];
    zip_of(&records)
}

/// A minimal zip writer: `(name, method, stored bytes, plain bytes)` per record.
fn zip_of(records: &[(&str, u16, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, method, stored, plain) in records {
        let offset = out.len() as u32;
        let crc = crc32fast::hash(plain);
        for (v, central) in [(&mut out, false), (&mut cd, true)] {
            u32le(v, if central { 0x0201_4b50 } else { 0x0403_4b50 });
            if central {
                u16le(v, 20);
            }
            u16le(v, 20);
            u16le(v, 0);
            u16le(v, *method);
            u16le(v, 0);
            u16le(v, 0);
            u32le(v, crc);
            u32le(v, stored.len() as u32);
            u32le(v, plain.len() as u32);
            u16le(v, name.len() as u16);
            u16le(v, 0);
            if central {
                u16le(v, 0);
                u16le(v, 0);
                u16le(v, 0);
                u32le(v, 0);
                u32le(v, offset);
            }
            v.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(stored);
    }
    finish_zip(&mut out, &cd, records.len());
    out
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_fffe,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// Positions of zip signatures (`PK` followed by 1/2, 3/4, 5/6, 6/6, 6/7, 7/8).
fn signature_positions(data: &[u8]) -> Vec<usize> {
    data.windows(4)
        .enumerate()
        .filter(|(_, w)| w[0] == b'P' && w[1] == b'K' && w[2] <= 8 && w[3] <= 8)
        .map(|(i, _)| i)
        .collect()
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, sigs: &[usize]) -> String {
    let len = data.len();
    match rng.below(8) {
        0 if len > 0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            format!("flip {n} bits")
        }
        1 if len > 0 => {
            let at = rng.below(len);
            let n = (1 + rng.below(32)).min(len - at);
            for b in &mut data[at..at + n] {
                *b = rng.byte();
            }
            format!("overwrite {n} bytes at {at}")
        }
        2 | 3 if !sigs.is_empty() => {
            // A header field: a few bytes after a signature, overwritten with an
            // integer chosen to hit size/offset/count checks.
            let sig = sigs[rng.below(sigs.len())];
            let at = sig + 4 + rng.below(52);
            let width = [2usize, 4, 8][rng.below(3)];
            let v = match rng.below(4) {
                0 => len as u64 + rng.below(3) as u64,
                1 => (len as u64).wrapping_sub(1 + rng.below(64) as u64),
                _ => INTERESTING[rng.below(INTERESTING.len())],
            };
            if at + width <= len {
                data[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            format!("field {v:#x} ({width} bytes) at {at}")
        }
        4 => {
            let cut = rng.below(len + 1);
            data.truncate(cut);
            format!("truncate to {cut}")
        }
        5 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(64);
            let ins: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            data.splice(at..at, ins);
            format!("insert {n} bytes at {at}")
        }
        6 if len > 0 => {
            let at = rng.below(len);
            let n = (1 + rng.below(64)).min(len - at);
            data.drain(at..at + n);
            format!("delete {n} bytes at {at}")
        }
        _ => {
            // Copy one stretch of the file over another (duplicated headers, names).
            if len < 2 {
                return "noop".into();
            }
            let from = rng.below(len);
            let to = rng.below(len);
            let n = (1 + rng.below(64)).min(len - from).min(len - to);
            let chunk = data[from..from + n].to_vec();
            data[to..to + n].copy_from_slice(&chunk);
            format!("copy {n} bytes {from}->{to}")
        }
    }
}

/// Records at most this big are also read into fresh buffers (the reader bounds
/// what it allocates itself; this keeps the test's own allocations small).
const BUFFER_LIMIT: u64 = 64 << 20;

/// Everything the binding does with an archive, with every result ignored: only a
/// panic (or a crash) is a failure.
fn exercise_archive(archive: &Archive) {
    let _ = archive.prefix();
    let _ = archive.names();
    let _ = archive.get("data.pkl");
    let _ = archive.require("data/0");
    let records = archive.records();
    for rec in records {
        let _ = archive.stored_slice(rec);
        let _ = archive.verify_record(rec);
        // `read` sizes its buffer from the record: it must refuse absurd sizes itself.
        if let Ok(bytes) = archive.read(rec, true) {
            if rec.name.ends_with("data.pkl") {
                let _ = pickle::scan(&bytes);
            }
        }
        let _ = archive.read(rec, false);
        if rec.size <= BUFFER_LIMIT {
            let mut buf = vec![0u8; rec.size as usize];
            let _ = archive.read_into(rec, &mut buf, true);
            for swap in [0usize, 2, 4, 8] {
                let jobs = vec![ReadJob {
                    record: rec,
                    dst: &mut buf,
                    swap,
                }];
                let _ = archive.read_many_into(jobs, 2, swap == 4);
            }
            // A wrong-size destination must be an error, not a short or long copy.
            let mut wrong = vec![0u8; rec.size as usize + 1];
            let _ = archive.read_many_into(
                vec![ReadJob {
                    record: rec,
                    dst: &mut wrong,
                    swap: 0,
                }],
                1,
                false,
            );
        }
    }
    // Everything at once, on several threads, as a load does.
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
    let jobs: Vec<ReadJob<'_>> = records
        .iter()
        .zip(bufs.iter_mut())
        .filter(|(r, _)| r.size <= BUFFER_LIMIT)
        .map(|(record, dst)| ReadJob {
            record,
            dst: &mut dst[..],
            swap: 2,
        })
        .collect();
    let _ = archive.read_many_into(jobs, 3, false);
}

fn exercise_bytes(data: &[u8]) {
    let _ = pickle::scan(data);
    if let Ok(archive) = Archive::open(Box::new(MemorySource(data.to_vec()))) {
        exercise_archive(&archive);
    }
}

/// The same through positioned file reads (the eager-load path, with its header window).
fn exercise_file(data: &[u8], dir: &std::path::Path) {
    let path = dir.join("mutant.pt");
    std::fs::write(&path, data).unwrap();
    let source = FileSource::new(std::fs::File::open(&path).unwrap()).unwrap();
    if let Ok(archive) = Archive::open(Box::new(source)) {
        exercise_archive(&archive);
    }
}

fn iterations() -> usize {
    std::env::var("FASTSERIAL_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000)
}

/// Fixtures larger than this are left out of the mutation corpus: every mutant is
/// read a dozen ways, and big ones would only slow the run without new paths.
const MAX_CORPUS_FILE: usize = 256 << 10;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut corpus: Vec<_> = fixture_files()
        .into_iter()
        .filter(|(_, data)| data.len() <= MAX_CORPUS_FILE)
        .collect();
    corpus.push(("<written>".into(), written_archive()));
    corpus.push(("<deflated>".into(), deflated_archive()));
    corpus
}

#[test]
fn unmutated_corpus_opens() {
    for (name, data) in fixture_files().into_iter().chain(corpus()) {
        let zip = data.starts_with(b"PK\x03\x04");
        let opened = Archive::open(Box::new(MemorySource(data.clone())));
        assert_eq!(opened.is_ok(), zip, "{name}: {:?}", opened.err());
        if let Ok(archive) = opened {
            for rec in archive.records() {
                archive
                    .verify_record(rec)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
}

#[test]
fn mutated_archives_never_panic() {
    let corpus = corpus();
    let dir = tempfile::tempdir().unwrap();
    let n = iterations();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut opened = 0usize;
    for i in 0..n {
        let (name, original) = &corpus[i % corpus.len()];
        let seed = rng.next() | 1;
        let mut local = Rng(seed);
        let mut data = original.clone();
        let sigs = signature_positions(&data);
        let steps = 1 + local.below(3);
        let what: Vec<String> = (0..steps)
            .map(|_| mutate(&mut local, &mut data, &sigs))
            .collect();
        let via_file = i % 8 == 0;
        let result = catch_unwind(AssertUnwindSafe(|| {
            if via_file {
                exercise_file(&data, dir.path());
            } else {
                exercise_bytes(&data);
            }
        }));
        if result.is_err() {
            let crash = dir.path().join(format!("crash-{seed:016x}.bin"));
            std::fs::write(&crash, &data).unwrap();
            let keep = std::env::temp_dir().join(format!("fastserial-crash-{seed:016x}.bin"));
            let _ = std::fs::copy(&crash, &keep);
            panic!(
                "panic on mutant {i} of {name} (seed {seed:#x}, {}): input saved to {}",
                what.join("; "),
                keep.display()
            );
        }
        if Archive::open(Box::new(MemorySource(data))).is_ok() {
            opened += 1;
        }
    }
    // The mutations must not be so destructive that the readers are never reached.
    assert!(opened * 10 >= n, "only {opened} of {n} mutants opened");
}

#[test]
fn mutated_pickles_never_panic() {
    let mut pickles: Vec<Vec<u8>> = Vec::new();
    for (_, data) in corpus() {
        if let Ok(archive) = Archive::open(Box::new(MemorySource(data))) {
            if let Some(rec) = archive.get("data.pkl") {
                pickles.push(archive.read(rec, true).unwrap());
            }
        }
    }
    assert!(pickles.len() >= 5);
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for i in 0..iterations() {
        let mut p = pickles[i % pickles.len()].clone();
        let seed = rng.next() | 1;
        let mut local = Rng(seed);
        for _ in 0..1 + local.below(4) {
            mutate(&mut local, &mut p, &[]);
        }
        let r = catch_unwind(|| pickle::scan(&p));
        assert!(
            r.is_ok(),
            "pickle::scan panicked on mutant {i} (seed {seed:#x}): {p:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let n = rng.below(512);
        let mut data: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
        // Half of them end like a zip, so the directory parsing is reached.
        if rng.below(2) == 0 && n >= 22 {
            let at = n - 22;
            data[at..at + 4].copy_from_slice(b"PK\x05\x06");
            data[n - 2] = 0;
            data[n - 1] = 0;
        }
        exercise_bytes(&data);
    }
}
