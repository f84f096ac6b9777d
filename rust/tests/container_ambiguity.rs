//! One zip reading, torch's, or a refusal. Archives that torch's zip reader (miniz
//! 3.0.2 behind `PyTorchStreamReader`) and other zip readers would read differently
//! are refused with `Error::Ambiguous`: two end records, zip64 and classic end records
//! that disagree, duplicate or case-colliding names, overlapping records, a gap before
//! the end records. Bytes appended after an archive are read as torch reads them.

use _fastserial::container::spec::miniz_scan_floor;
use _fastserial::{Archive, ArchiveWriter, Error, FileSource, MemorySource, Result};
use std::io::Write;

mod common;
use common::{finish_zip, u16le, u32le};

fn open(bytes: &[u8]) -> Result<Archive> {
    Archive::open(Box::new(MemorySource(bytes.to_vec())))
}

/// Opens `bytes` through a real file (positioned reads, no zero-copy slice), so
/// that `deferred` defers the local headers of the `data/` records.
fn open_file(bytes: &[u8], deferred: bool) -> Result<Archive> {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    let source = Box::new(FileSource::new(file).unwrap());
    if deferred {
        Archive::open_deferring_data(source)
    } else {
        Archive::open(source)
    }
}

/// Every record's name and bytes, CRC-checked.
fn contents(archive: &Archive) -> Vec<(String, Vec<u8>)> {
    archive
        .records()
        .iter()
        .map(|r| (r.name.clone(), archive.read(r, true).unwrap()))
        .collect()
}

/// Asserts `result` is a refusal as ambiguous whose message contains `needle`.
#[track_caller]
fn assert_ambiguous(result: Result<Archive>, needle: &str) {
    match result {
        Err(Error::Ambiguous(msg)) => assert!(msg.contains(needle), "{msg}"),
        Err(other) => panic!("expected an ambiguity ('{needle}'), got: {other}"),
        Ok(_) => panic!("expected an ambiguity ('{needle}'), but the archive opened"),
    }
}

#[track_caller]
fn assert_refused(result: Result<Archive>, needle: &str) {
    match result {
        Err(e) => assert!(e.to_string().contains(needle), "{e}"),
        Ok(_) => panic!("expected a refusal ('{needle}'), but the archive opened"),
    }
}

/// An archive laid out as torch writes one (zip64 end records always present), with
/// a `data/0` record of `storage_bytes`.
fn written_with(storage_bytes: &[u8]) -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new(), "archive");
    w.write_record("data.pkl", b"\x80\x02}q\x00.").unwrap();
    w.write_record("byteorder", b"little").unwrap();
    w.write_record("data/0", storage_bytes).unwrap();
    w.write_record("version", b"3\n").unwrap();
    w.finish().unwrap()
}

fn written() -> Vec<u8> {
    written_with(&[7u8; 256])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Offsets in a written archive: its central directory, zip64 end record, zip64
/// locator and classic end record, and its record count.
struct Tail {
    cd: usize,
    z64: usize,
    loc: usize,
    eocd: usize,
    entries: u64,
}

fn tail(b: &[u8]) -> Tail {
    let eocd = b.len() - 22;
    let loc = eocd - 20;
    let z64 = loc - 56;
    assert_eq!(&b[eocd..eocd + 4], b"PK\x05\x06");
    assert_eq!(&b[loc..loc + 4], b"PK\x06\x07");
    assert_eq!(&b[z64..z64 + 4], b"PK\x06\x06");
    Tail {
        cd: get64(b, z64 + 48) as usize,
        z64,
        loc,
        eocd,
        entries: get64(b, z64 + 32),
    }
}

/// The end records torch writes for a directory of `entries` entries at `cd_offset`
/// (`cd_size` bytes), placed at offset `at`: zip64 end record, locator, classic end
/// record with a comment of `comment_len` bytes (not included).
fn end_records(at: u64, entries: u64, cd_offset: u64, cd_size: u64, comment_len: u16) -> Vec<u8> {
    let mut v = Vec::new();
    u32le(&mut v, 0x0606_4b50);
    v.extend_from_slice(&44u64.to_le_bytes());
    u16le(&mut v, 0x031e);
    u16le(&mut v, 45);
    u32le(&mut v, 0);
    u32le(&mut v, 0);
    for x in [entries, entries, cd_size, cd_offset] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    u32le(&mut v, 0x0706_4b50);
    u32le(&mut v, 0);
    v.extend_from_slice(&at.to_le_bytes());
    u32le(&mut v, 1);
    u32le(&mut v, 0x0605_4b50);
    u16le(&mut v, 0);
    u16le(&mut v, 0);
    u16le(&mut v, entries.min(0xFFFF) as u16);
    u16le(&mut v, entries.min(0xFFFF) as u16);
    u32le(&mut v, cd_size as u32);
    u32le(&mut v, cd_offset as u32);
    u16le(&mut v, comment_len);
    v
}

/// A local header for a stored record `name` with `extra` zero bytes of extra
/// field, followed by `data`.
fn local(name: &[u8], extra: usize, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    u32le(&mut v, 0x0403_4b50);
    for x in [20u16, 0, 0, 0, 0] {
        u16le(&mut v, x);
    }
    u32le(&mut v, crc32fast::hash(data));
    u32le(&mut v, data.len() as u32);
    u32le(&mut v, data.len() as u32);
    u16le(&mut v, name.len() as u16);
    u16le(&mut v, extra as u16);
    v.extend_from_slice(name);
    v.extend(std::iter::repeat_n(0u8, extra));
    v.extend_from_slice(data);
    v
}

/// A central-directory entry for a stored record `name` of `size` bytes with CRC
/// `crc`, whose local header is at `offset`.
fn central(name: &[u8], offset: u32, size: u32, crc: u32) -> Vec<u8> {
    let mut v = Vec::new();
    u32le(&mut v, 0x0201_4b50);
    for x in [20u16, 20, 0, 0, 0, 0] {
        u16le(&mut v, x);
    }
    u32le(&mut v, crc);
    u32le(&mut v, size);
    u32le(&mut v, size);
    u16le(&mut v, name.len() as u16);
    for x in [0u16, 0, 0, 0] {
        u16le(&mut v, x);
    }
    u32le(&mut v, 0);
    u32le(&mut v, offset);
    v.extend_from_slice(name);
    v
}

/// A plain zip (classic end record only) of stored `(name, data)` records.
fn zip_of(records: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data) in records {
        let at = out.len() as u32;
        out.extend_from_slice(&local(name, 0, data));
        cd.extend_from_slice(&central(name, at, data.len() as u32, crc32fast::hash(data)));
    }
    finish_zip(&mut out, &cd, records.len());
    out
}

/// Bytes that hold no end-record signature.
fn junk(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8 | 0x80).collect()
}

// ------------------------------------------------------------------ trailing bytes

#[test]
fn scan_floor_matches_what_torch_was_measured_to_find() {
    // torch 2.15 on a 1577-byte checkpoint (end record at 1555) plus N junk bytes:
    // loads for N = 4074, 8000, 69000; fails for N = 4075, 65535 (miniz's next chunk
    // would start before offset 0), and on a 26 MB one for 69563 but not 69562.
    for (len, found) in [
        (1577 + 4074, true),
        (1577 + 4075, false),
        (1577 + 8000, true),
        (1577 + 65_535, false),
        (1577 + 69_000, true),
    ] {
        assert_eq!(miniz_scan_floor(len) <= 1555, found, "len {len}");
    }
    let big = 26_126_727u64;
    assert_eq!(big - miniz_scan_floor(big), 69_584);
    assert_eq!(miniz_scan_floor(100), 0);
}

#[test]
fn bytes_after_the_archive_are_read_as_torch_reads_them() {
    // A storage big enough that torch's scan reaches its full 69584 bytes.
    let a = written_with(&junk(80_000));
    let want = contents(&open(&a).unwrap());
    for n in [1usize, 21, 22, 100, 4096, 65_536, 69_584 - 22] {
        let mut f = a.clone();
        f.extend_from_slice(&junk(n));
        assert_eq!(contents(&open(&f).unwrap()), want, "{n} bytes");
        assert_eq!(contents(&open_file(&f, false).unwrap()), want, "{n} bytes");
        assert_eq!(contents(&open_file(&f, true).unwrap()), want, "{n} bytes");
    }
    // Past where torch's reader looks: refused, as torch refuses it.
    let mut f = a.clone();
    f.extend_from_slice(&junk(69_584 - 21));
    assert_refused(open(&f), "no end-of-central-directory record");
}

#[test]
fn small_archives_with_trailing_bytes_follow_torchs_shorter_scan() {
    let a = written();
    assert!(a.len() + 4075 < 8189);
    let mut f = a.clone();
    f.extend_from_slice(&junk(4074));
    assert_eq!(contents(&open(&f).unwrap()), contents(&open(&a).unwrap()));
    f.push(0x80);
    assert_refused(open(&f), "no end-of-central-directory record");
}

#[test]
fn end_record_signatures_inside_record_data_are_not_end_records() {
    // A storage holding what looks like end records, comment lengths included.
    let mut fake = Vec::new();
    for comment in [0u16, 7, 0xFFFF] {
        fake.extend_from_slice(&end_records(0, 1, 0, 46, comment));
    }
    let a = written_with(&fake);
    let want = contents(&open(&a).unwrap());
    let mut f = a.clone();
    f.extend_from_slice(&junk(100));
    assert_eq!(contents(&open(&f).unwrap()), want);
}

// -------------------------------------------------------------- two end records

#[test]
fn a_second_end_record_that_strict_readers_take_is_refused() {
    let a = written();
    let t = tail(&a);
    let want = contents(&open(&a).unwrap());
    let cd = a[t.cd..t.z64].to_vec();
    // Another directory and end records appended: torch's reader takes the last end
    // record, and so does every reader that scans back from the end while that
    // record ends the file, even when the first one's comment ends it too.
    let mut f = a.clone();
    let cd2 = f.len() as u64;
    f.extend_from_slice(&cd);
    let z2 = f.len() as u64;
    f.extend_from_slice(&end_records(z2, t.entries, cd2, cd.len() as u64, 0));
    let mut g = f.clone();
    let comment = (g.len() - a.len()) as u16;
    put16(&mut g, t.eocd + 20, comment);
    assert_eq!(contents(&open(&g).unwrap()), want);
    // With bytes after the last one, torch's reader still takes it: read as torch.
    f.extend_from_slice(&junk(5));
    assert_eq!(contents(&open(&f).unwrap()), want);
    // But when the first one's comment then ends the file, a strict reader (the
    // comment must end the file) takes the first: refused.
    let comment = (f.len() - a.len()) as u16;
    put16(&mut f, t.eocd + 20, comment);
    assert_ambiguous(open(&f), "two end-of-central-directory records");
    assert_ambiguous(open_file(&f, true), "two end-of-central-directory records");
}

#[test]
fn a_last_end_record_whose_comment_runs_past_the_end_beside_one_that_fits_is_refused() {
    let mut f = written();
    // A bare end record (its comment length runs past the end of the file):
    // torch's reader takes it, readers that skip such records take the real one.
    f.extend_from_slice(b"PK\x05\x06");
    f.extend_from_slice(&[0u8; 16]);
    f.extend_from_slice(&0xFFFFu16.to_le_bytes());
    assert_ambiguous(open(&f), "the last whose comment fits in the file");
}

#[test]
fn concatenated_archives_are_refused() {
    // `cat a.zip b.zip`: b's offsets count from its own start. Readers that allow for
    // prepended data shift them; torch's reader reads them as they are.
    let a = zip_of(&[(b"arc/data.pkl", b"first")]);
    let b = zip_of(&[(b"arc/data.pkl", b"second")]);
    let mut f = a.clone();
    f.extend_from_slice(&b);
    assert_ambiguous(open(&f), "bytes lie between the central directory");
}

#[test]
fn a_gap_between_the_directory_and_the_end_records_is_refused() {
    let a = written();
    let t = tail(&a);
    let mut f = a[..t.z64].to_vec();
    f.extend_from_slice(&[0u8; 10]);
    let z = f.len() as u64;
    f.extend_from_slice(&end_records(
        z,
        t.entries,
        t.cd as u64,
        (t.z64 - t.cd) as u64,
        0,
    ));
    assert_ambiguous(open(&f), "10 bytes lie between the central directory");
}

// ------------------------------------------------------- zip64 vs classic records

#[test]
fn zip64_and_classic_end_records_that_disagree_are_refused() {
    let a = written();
    let t = tail(&a);
    let e = t.eocd;
    // (what the refusal names, offset, width, value)
    let cases = [
        ("on the number of records (", e + 10, 2, t.entries + 1),
        (
            "on the number of records on this disk",
            e + 8,
            2,
            t.entries + 1,
        ),
        (
            "on the central directory's size",
            e + 12,
            4,
            (t.z64 - t.cd) as u64 - 1,
        ),
        (
            "on the central directory's offset",
            e + 16,
            4,
            t.cd as u64 + 46,
        ),
        ("on the disk number", e + 4, 2, 1),
        ("on the central directory's offset", t.z64 + 48, 8, 0),
        ("on the number of records (", t.z64 + 32, 8, t.entries - 1),
    ];
    for (needle, at, width, value) in cases {
        let mut f = a.clone();
        f[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        assert_ambiguous(open(&f), needle);
    }
    // Classic fields that defer to zip64 (0xFFFF, 0xFFFFFFFF) are no disagreement.
    let mut f = a.clone();
    put16(&mut f, e + 8, 0xFFFF);
    put16(&mut f, e + 10, 0xFFFF);
    put32(&mut f, e + 12, 0xFFFF_FFFF);
    put32(&mut f, e + 16, 0xFFFF_FFFF);
    assert_eq!(contents(&open(&f).unwrap()), contents(&open(&a).unwrap()));
}

#[test]
fn a_zip64_directory_hiding_another_pickle_is_refused() {
    // The zip64 end record points to a directory whose data.pkl is another record;
    // the classic end record to the original directory. torch reads the first,
    // classic-first readers the second (and the old reader took the larger offset).
    let a = written();
    let t = tail(&a);
    let cd_a = a[t.cd..t.z64].to_vec();
    let mut f = a[..t.cd].to_vec();
    let evil_at = f.len();
    let evil = b"\x80\x02cbuiltins\neval\nq\x00.";
    f.extend_from_slice(&local(b"archive/data.pkl", 0, evil));
    // The directory again, with data.pkl (its first entry) pointing at the new record.
    let mut cd_b = cd_a.clone();
    assert_eq!(&cd_b[46..62], b"archive/data.pkl");
    put32(&mut cd_b, 16, crc32fast::hash(evil));
    put32(&mut cd_b, 20, evil.len() as u32);
    put32(&mut cd_b, 24, evil.len() as u32);
    put32(&mut cd_b, 42, evil_at as u32);
    let cd_b_at = f.len() as u64;
    f.extend_from_slice(&cd_b);
    let cd_a_at = f.len() as u64;
    f.extend_from_slice(&cd_a);
    let z = f.len() as u64;
    let mut end = end_records(z, t.entries, cd_b_at, cd_b.len() as u64, 0);
    let classic = end.len() - 22;
    put32(&mut end, classic + 16, cd_a_at as u32);
    f.extend_from_slice(&end);
    assert_ambiguous(open(&f), "disagree on the central directory's offset");
}

#[test]
fn a_zip64_locator_pointing_away_from_the_record_before_it_is_refused() {
    let a = written();
    let t = tail(&a);
    let mut f = a.clone();
    put64(&mut f, t.loc + 8, 0);
    assert_ambiguous(open(&f), "zip64 locator points to offset 0");
    put64(&mut f, t.loc + 8, u64::MAX);
    assert_refused(open(&f), "out of bounds");
}

#[test]
fn multi_disk_end_records_are_refused_as_torch_refuses_them() {
    let a = zip_of(&[(b"arc/data.pkl", b"x"), (b"arc/version", b"3")]);
    let mut f = a.clone();
    let e = f.len() - 22;
    put16(&mut f, e + 8, 1);
    assert_refused(open(&f), "multi-disk");
    let mut f = a.clone();
    put16(&mut f, e + 6, 2);
    assert_refused(open(&f), "multi-disk");
}

#[test]
fn directory_bytes_after_the_declared_entries_are_refused() {
    let mut f = zip_of(&[(b"arc/data.pkl", b"benign"), (b"arc/data.pkl", b"evil")]);
    let e = f.len() - 22;
    put16(&mut f, e + 8, 1);
    put16(&mut f, e + 10, 1);
    assert_ambiguous(open(&f), "after its 1 declared entries");
}

// ------------------------------------------------------------------------- names

#[test]
fn duplicate_names_are_refused() {
    let f = zip_of(&[
        (b"arc/data.pkl", b"benign"),
        (b"arc/version", b"3"),
        (b"arc/data.pkl", b"evil"),
    ]);
    assert_ambiguous(open(&f), "two records are named 'arc/data.pkl'");
    assert_ambiguous(open_file(&f, true), "two records are named 'arc/data.pkl'");
}

#[test]
fn names_that_differ_only_in_case_are_refused() {
    for (a, b) in [
        (&b"arc/data.pkl"[..], &b"arc/DATA.PKL"[..]),
        (b"arc/data/0", b"arc/Data/0"),
        (b"arc/byteorder", b"arc/byteOrder"),
    ] {
        let f = zip_of(&[(a, b"one"), (b, b"two")]);
        assert_ambiguous(open(&f), "differ only in case");
    }
    // Non-ASCII letters are not folded by torch's reader: distinct names.
    let f = zip_of(&[
        ("arc/\u{e9}".as_bytes(), b"one"),
        ("arc/\u{c9}".as_bytes(), b"two"),
    ]);
    assert_eq!(open(&f).unwrap().records().len(), 2);
}

#[test]
fn many_records_with_a_late_duplicate_are_refused() {
    // Past the count where names are indexed on a thread of their own.
    let names: Vec<String> = (0..5000)
        .map(|i| format!("arc/data/{i}"))
        .chain(["arc/DATA/17".to_string()])
        .collect();
    let records: Vec<(&[u8], &[u8])> = names.iter().map(|n| (n.as_bytes(), &b"x"[..])).collect();
    let f = zip_of(&records);
    assert_ambiguous(open(&f), "'arc/data/17' and 'arc/DATA/17'");
    assert_ambiguous(open_file(&f, false), "'arc/data/17' and 'arc/DATA/17'");
}

#[test]
fn names_are_looked_up_case_insensitively_as_torch_does() {
    let f = zip_of(&[
        (b"arc/data.pkl", b"pickle"),
        (b"arc/BYTEORDER", b"big"),
        (b"arc/data/Key", b"storage"),
    ]);
    let archive = open(&f).unwrap();
    for (query, want) in [
        ("byteorder", &b"big"[..]),
        ("ByteOrder", b"big"),
        ("DATA.PKL", b"pickle"),
        ("data/key", b"storage"),
    ] {
        let rec = archive.get(query).unwrap_or_else(|| panic!("{query}"));
        assert_eq!(archive.read(rec, true).unwrap(), want, "{query}");
    }
    assert!(archive.get("byteorde").is_none());
    assert_eq!(archive.names(), vec!["data.pkl", "BYTEORDER", "data/Key"]);
}

#[test]
fn records_outside_the_top_folder_are_refused_as_torch_refuses_them() {
    let f = zip_of(&[(b"arc/data.pkl", b"x"), (b"ARC/version", b"3")]);
    assert_refused(
        open(&f),
        "'ARC/version': record is not inside the archive's top folder",
    );
}

#[test]
fn names_that_are_not_utf8_are_refused() {
    let f = zip_of(&[(b"arc/data.pkl", b"x"), (b"arc/data/\xff", b"y")]);
    assert_refused(open(&f), "not valid UTF-8");
}

// ------------------------------------------------------------- record placement

/// Two records where `data/1`'s local header and data lie inside `data/0`'s data,
/// `data/0`'s local header carrying `extra` bytes of extra field (torch's padding);
/// the directory lists `data/1` first when `inner_first`.
fn nested(extra: usize, lead: usize, inner_first: bool) -> Vec<u8> {
    let inner = local(b"arc/data/1", 0, b"bb");
    let mut outer_data = vec![0u8; lead];
    outer_data.extend_from_slice(&inner);
    outer_data.resize(lead + inner.len() + 12, 0);
    let mut out = local(b"arc/data/0", extra, &outer_data);
    let inner_at = (30 + 10 + extra + lead) as u32;
    let outer_entry = central(
        b"arc/data/0",
        0,
        outer_data.len() as u32,
        crc32fast::hash(&outer_data),
    );
    let inner_entry = central(b"arc/data/1", inner_at, 2, crc32fast::hash(b"bb"));
    let cd = if inner_first {
        [inner_entry, outer_entry].concat()
    } else {
        [outer_entry, inner_entry].concat()
    };
    finish_zip(&mut out, &cd, 2);
    out
}

#[test]
fn overlapping_records_are_refused() {
    for inner_first in [false, true] {
        let f = nested(0, 2, inner_first);
        assert_ambiguous(open(&f), "overlap");
        assert_ambiguous(open_file(&f, false), "overlap");
        assert_ambiguous(open_file(&f, true), "overlap");
    }
}

#[test]
fn overlaps_found_only_by_deferred_headers_are_refused_at_first_use() {
    // data/1 starts after the least data/0 can span without its local extra field,
    // but inside what it spans with it: only reading data/0's header tells.
    let f = nested(64, 46, true);
    assert_ambiguous(open(&f), "overlap");
    let archive = open_file(&f, true).unwrap();
    let rec = archive.get("data/1").unwrap();
    let msg = archive.read(rec, true).unwrap_err().to_string();
    assert!(msg.contains("overlap"), "{msg}");
}

#[test]
fn records_reaching_into_the_directory_or_outside_the_file_are_refused() {
    let data = b"0123456789";
    let mut out = local(b"arc/data.pkl", 0, data);
    let cd = central(b"arc/data.pkl", 0, 20, crc32fast::hash(data));
    finish_zip(&mut out, &cd, 1);
    assert_refused(open(&out), "runs past the end of the record area");
    assert_refused(
        open_file(&out, true),
        "runs past the end of the record area",
    );

    let mut out = local(b"arc/data.pkl", 0, data);
    let mut cd = central(b"arc/data.pkl", 0, 10, crc32fast::hash(data));
    cd.extend_from_slice(&central(b"arc/data/0", 1_000_000, 10, 0));
    finish_zip(&mut out, &cd, 2);
    assert_refused(
        open(&out),
        "local header offset 1000000 lies outside the file",
    );
}

#[test]
fn archives_written_by_the_writer_are_never_refused() {
    for n in [1usize, 2, 100, 5000] {
        let mut w = ArchiveWriter::new(Vec::new(), "Model_v2");
        w.write_record("data.pkl", b"\x80\x02N.").unwrap();
        for i in 0..n {
            w.write_record(&format!("data/{i}"), &vec![i as u8; i % 300])
                .unwrap();
        }
        let bytes = w.finish().unwrap();
        let archive = open(&bytes).unwrap();
        assert_eq!(archive.records().len(), n + 1);
        assert!(open_file(&bytes, true).is_ok());
    }
}
