//! `ArchiveWriter` -> `Archive` round trips: every record's data 64-byte aligned,
//! zip64 end records once entries pass 65535, CRCs checked, and damaged archives
//! (truncated, corrupted, hostile sizes) answered with errors, never panics.

use std::io::Write;

use _fastserial::{Archive, ArchiveWriter, Error, FileSource, MemorySource, ReadJob};

mod common;
use common::{finish_zip, u16le, u32le};

fn open(bytes: Vec<u8>) -> _fastserial::Result<Archive> {
    Archive::open(Box::new(MemorySource(bytes)))
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

const SIZES: [usize; 10] = [0, 1, 2, 63, 64, 65, 127, 1000, 4096, 100_003];

fn sample_archive() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut w = ArchiveWriter::new(Vec::new(), "ckpt");
    let mut expect = Vec::new();
    for (i, &n) in SIZES.iter().enumerate() {
        let name = format!("data/{i}");
        let data = pattern(n, i as u8);
        w.write_record(&name, &data).unwrap();
        expect.push((name, data));
    }
    (w.finish().unwrap(), expect)
}

#[test]
fn round_trip_keeps_names_bytes_order_and_alignment() {
    let (bytes, expect) = sample_archive();
    let archive = open(bytes.clone()).unwrap();
    assert_eq!(archive.prefix(), "ckpt");
    let names: Vec<&str> = archive.names();
    let want: Vec<&str> = expect.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want);
    for (name, data) in &expect {
        let rec = archive.require(name).unwrap();
        assert_eq!(
            rec.data_offset % 64,
            0,
            "{name} data at {} is not 64-byte aligned",
            rec.data_offset
        );
        assert_eq!(rec.size as usize, data.len());
        assert_eq!(rec.crc32, crc32fast::hash(data));
        assert_eq!(&archive.read(rec, true).unwrap(), data);
        assert_eq!(archive.stored_slice(rec).unwrap(), &data[..]);
        archive.verify_record(rec).unwrap();
    }
    // The same through positioned file reads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.pt");
    std::fs::write(&path, &bytes).unwrap();
    let archive = Archive::open(Box::new(
        FileSource::new(std::fs::File::open(&path).unwrap()).unwrap(),
    ))
    .unwrap();
    let bufs = read_all(&archive, &expect, 3, true, 0).unwrap();
    for ((_, data), got) in expect.iter().zip(&bufs) {
        assert_eq!(data, got);
    }
}

#[test]
fn many_records_switch_to_zip64_end_records() {
    const N: usize = 70_000;
    let mut w = ArchiveWriter::new(Vec::new(), "many");
    for i in 0..N {
        w.write_record(&format!("data/{i}"), &(i as u32).to_le_bytes())
            .unwrap();
    }
    let bytes = w.finish().unwrap();
    // The classic end record saturates its 16-bit entry count.
    let eocd = &bytes[bytes.len() - 22..];
    assert_eq!(&eocd[..4], b"PK\x05\x06");
    assert_eq!(u16::from_le_bytes([eocd[10], eocd[11]]), 0xFFFF);
    let archive = open(bytes).unwrap();
    assert_eq!(archive.records().len(), N);
    for i in [0, 1, 65_534, 65_535, 65_536, N - 1] {
        let rec = archive.require(&format!("data/{i}")).unwrap();
        assert_eq!(rec.data_offset % 64, 0);
        assert_eq!(archive.read(rec, true).unwrap(), (i as u32).to_le_bytes());
    }
}

#[test]
fn corrupted_data_fails_crc_checks_but_not_unchecked_reads() {
    let (mut bytes, expect) = sample_archive();
    let archive = open(bytes.clone()).unwrap();
    let rec = archive.require("data/7").unwrap().clone();
    bytes[rec.data_offset as usize + 10] ^= 0x40;
    let archive = open(bytes).unwrap();
    let rec = archive.require("data/7").unwrap();
    let err = archive.verify_record(rec).unwrap_err().to_string();
    assert!(
        err.contains("ckpt/data/7") && err.contains("CRC32"),
        "{err}"
    );
    assert!(archive.read(rec, true).is_err());
    let unchecked = archive.read(rec, false).unwrap();
    assert_ne!(unchecked, expect[7].1);
    let mut dst = vec![0u8; rec.size as usize];
    let job = vec![ReadJob {
        record: rec,
        dst: &mut dst,
        swap: 0,
    }];
    assert!(archive.read_many_into(job, 2, true).is_err());
}

#[test]
fn every_truncation_is_an_error() {
    let mut w = ArchiveWriter::new(Vec::new(), "t");
    w.write_record("data.pkl", b"\x80\x02N.").unwrap();
    w.write_record("data/0", &pattern(200, 1)).unwrap();
    let bytes = w.finish().unwrap();
    for cut in 0..bytes.len() {
        let r = open(bytes[..cut].to_vec());
        assert!(
            r.is_err(),
            "archive cut to {cut} of {} bytes opened",
            bytes.len()
        );
    }
    assert!(open(bytes).is_ok());
}

#[test]
fn wrong_destination_size_is_an_error_naming_the_record() {
    let (bytes, _) = sample_archive();
    let archive = open(bytes).unwrap();
    let rec = archive.require("data/3").unwrap();
    let mut dst = vec![0u8; rec.size as usize + 8];
    let err = archive
        .read_many_into(
            vec![ReadJob {
                record: rec,
                dst: &mut dst,
                swap: 0,
            }],
            1,
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("ckpt/data/3"), "{err}");
}

// ----------------------------------------------------------------- hand-built zips

/// One hand-built record: `(name, method, stored bytes, declared uncompressed size, crc)`.
type RawRecord<'a> = (&'a [u8], u16, Vec<u8>, u64, u32);

/// A minimal zip of `records`. Sizes that do not fit 32 bits go in a zip64 extra
/// field of the central header.
fn zip_of(records: &[RawRecord<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, method, stored, size, crc) in records {
        let offset = out.len() as u32;
        let zip64 = *size >= 0xFFFF_FFFF;
        for (v, central) in [(&mut out, false), (&mut cd, true)] {
            let extra = central && zip64;
            u32le(v, if central { 0x0201_4b50 } else { 0x0403_4b50 });
            if central {
                u16le(v, 20);
            }
            u16le(v, 20);
            u16le(v, 0);
            u16le(v, *method);
            u16le(v, 0);
            u16le(v, 0);
            u32le(v, *crc);
            u32le(v, stored.len() as u32);
            u32le(v, if zip64 { 0xFFFF_FFFF } else { *size as u32 });
            u16le(v, name.len() as u16);
            u16le(v, if extra { 12 } else { 0 });
            if central {
                u16le(v, 0);
                u16le(v, 0);
                u16le(v, 0);
                u32le(v, 0);
                u32le(v, offset);
            }
            v.extend_from_slice(name);
            if extra {
                u16le(v, 1);
                u16le(v, 8);
                v.extend_from_slice(&size.to_le_bytes());
            }
        }
        out.extend_from_slice(stored);
    }
    finish_zip(&mut out, &cd, records.len());
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn deflated_records_round_trip() {
    let plain = pattern(50_000, 3);
    let crc = crc32fast::hash(&plain);
    let bytes = zip_of(&[
        (
            b"arc/data.pkl",
            0,
            b"\x80\x02N.".to_vec(),
            4,
            crc32fast::hash(b"\x80\x02N."),
        ),
        (b"arc/data/0", 8, deflate(&plain), plain.len() as u64, crc),
    ]);
    let archive = open(bytes).unwrap();
    let rec = archive.require("data/0").unwrap();
    assert_eq!(archive.read(rec, true).unwrap(), plain);
    archive.verify_record(rec).unwrap();
}

/// Bug: a DEFLATE record declaring a huge uncompressed size made `read` allocate that
/// size up front (`vec![0; size]`), which aborts the process when the allocation fails
/// — `data.pkl` is read this way, so a 200-byte file could kill the interpreter.
#[test]
fn deflated_record_declaring_huge_size_is_refused_before_allocating() {
    let plain = b"\x80\x02N.".to_vec();
    let packed = deflate(&plain);
    for declared in [1u64 << 62, 1 << 40, 0xFFFF_FFFE, 1 << 28] {
        let bytes = zip_of(&[(
            b"arc/data.pkl",
            8,
            packed.clone(),
            declared,
            crc32fast::hash(&plain),
        )]);
        let err = match open(bytes.clone()) {
            Err(e) => e,
            Ok(archive) => {
                let rec = archive.require("data.pkl").unwrap();
                archive.read(rec, true).unwrap_err()
            }
        };
        let msg = err.to_string();
        assert!(msg.contains("arc/data.pkl"), "{msg}");
    }
}

#[test]
fn deflate_data_longer_or_shorter_than_declared_is_an_error() {
    let plain = pattern(5000, 9);
    let crc = crc32fast::hash(&plain);
    for declared in [4999u64, 5001] {
        let bytes = zip_of(&[(b"arc/data/0", 8, deflate(&plain), declared, crc)]);
        let archive = open(bytes).unwrap();
        let rec = archive.require("data/0").unwrap();
        assert!(archive.read(rec, false).is_err(), "declared {declared}");
    }
}

/// Bug: `Archive::names` sliced every record name at the top folder's length, which
/// panics when that byte falls inside a multi-byte UTF-8 character of a record that
/// is not in the top folder. Such records are now refused at open, as torch.load
/// refuses them (`get_all_records` requires the top folder), without a panic.
#[test]
fn names_with_non_ascii_record_outside_top_folder_do_not_panic() {
    let a = b"arc/data.pkl".as_slice();
    let odd = "abc\u{e9}".as_bytes(); // byte 4 (the prefix length + 1) is mid-character
    let bytes = zip_of(&[
        (a, 0, b"x".to_vec(), 1, crc32fast::hash(b"x")),
        (odd, 0, b"y".to_vec(), 1, crc32fast::hash(b"y")),
    ]);
    let msg = open(bytes).unwrap_err().to_string();
    assert!(
        msg.contains("abc\u{e9}") && msg.contains("not inside the archive's top folder 'arc/'"),
        "{msg}"
    );
}

#[test]
fn entry_count_beyond_the_directory_is_refused() {
    let mut bytes = zip_of(&[(b"arc/data.pkl", 0, b"x".to_vec(), 1, crc32fast::hash(b"x"))]);
    let n = bytes.len();
    bytes[n - 12..n - 10].copy_from_slice(&0xFFFEu16.to_le_bytes());
    let err = open(bytes).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded(_)), "{err}");
}

/// Reads every record of `expect` with one `read_many_into` call.
fn read_all(
    archive: &Archive,
    expect: &[(String, Vec<u8>)],
    threads: usize,
    verify: bool,
    swap: usize,
) -> _fastserial::Result<Vec<Vec<u8>>> {
    let mut bufs: Vec<Vec<u8>> = expect.iter().map(|(_, d)| vec![0u8; d.len()]).collect();
    let jobs: Vec<ReadJob<'_>> = expect
        .iter()
        .zip(bufs.iter_mut())
        .map(|((name, _), dst)| ReadJob {
            record: archive.get(name).unwrap(),
            dst,
            swap,
        })
        .collect();
    archive.read_many_into(jobs, threads, verify)?;
    Ok(bufs)
}

/// Many small records read from a file go through grouped reads (one pread per
/// neighbourhood): every byte lands in the right buffer, byte swaps apply per record,
/// a corrupted record is named by the CRC check, and a truncated file is an error.
#[test]
fn grouped_reads_of_small_records_from_a_file() {
    let mut w = ArchiveWriter::new(Vec::new(), "ckpt");
    let mut expect = Vec::new();
    for i in 0..1200usize {
        // A mix of sizes, including ones past the grouping threshold.
        let n = match i % 7 {
            0 => 0,
            1 => 2,
            2 => 1024,
            3 => 4000,
            4 if i % 5 == 0 => 260 << 10,
            4 => 6,
            _ => 64 + i % 200 * 2,
        };
        let name = format!("data/{i}");
        let data = pattern(n, i as u8);
        w.write_record(&name, &data).unwrap();
        expect.push((name, data));
    }
    let bytes = w.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.pt");
    std::fs::write(&path, &bytes).unwrap();
    let open_file = |p: &std::path::Path| {
        Archive::open(Box::new(
            FileSource::new(std::fs::File::open(p).unwrap()).unwrap(),
        ))
    };
    let archive = open_file(&path).unwrap();
    for (threads, verify, swap) in [(1, false, 0), (2, true, 0), (3, false, 2)] {
        let bufs = read_all(&archive, &expect, threads, verify, swap).unwrap();
        for ((name, data), got) in expect.iter().zip(&bufs) {
            let mut want = data.clone();
            if swap == 2 {
                want.chunks_exact_mut(2).for_each(|c| c.swap(0, 1));
            }
            assert_eq!(&want, got, "{name} (threads {threads}, swap {swap})");
        }
    }

    // Flip one data byte of a small record in the middle of a group.
    let victim = archive.get("data/1003").unwrap();
    assert_eq!(victim.size, 1024);
    let mut bad = bytes.clone();
    bad[victim.data_offset as usize + 17] ^= 0x40;
    let bad_path = dir.path().join("bad.pt");
    std::fs::write(&bad_path, &bad).unwrap();
    let err = read_all(&open_file(&bad_path).unwrap(), &expect, 2, true, 0).unwrap_err();
    assert!(
        err.to_string().contains("ckpt/data/1003") && err.to_string().contains("CRC32"),
        "{err}"
    );

    // Truncate the file under an open archive: the grouped read fails and the
    // per-record retry reports the record it could not read.
    let trunc_path = dir.path().join("trunc.pt");
    std::fs::write(&trunc_path, &bytes).unwrap();
    let trunc_archive = open_file(&trunc_path).unwrap();
    let cut = trunc_archive.get("data/600").unwrap().data_offset + 10;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trunc_path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let err = read_all(&trunc_archive, &expect, 1, false, 0).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("ckpt/data/"), "{err}");
}
