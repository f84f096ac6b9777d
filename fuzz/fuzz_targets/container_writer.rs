//! Coverage-guided fuzzing of the save path: the container writer, checked by the
//! container reader.
//!
//! The input is decoded into a top folder (prefix) and a list of records — names of
//! arbitrary UTF-8 (control characters, non-ASCII, `/`, `..`, empty, case variants and
//! exact repeats of earlier names, names under `data/`), data of arbitrary length (some
//! empty, now and then a generated record of up to 5 MiB, which takes the writer's
//! two-thread CRC path) — written with `ArchiveWriter` into a `Vec<u8>` and read back
//! with `Archive::open` over memory. The archive must:
//!
//! * open, unless the names are ones the reader calls ambiguous (two records whose
//!   names inside the top folder are equal ignoring ASCII case): then the reader must
//!   refuse it with `Error::Ambiguous` (the writer itself does not refuse them);
//! * list the records in write order with the names written (`prefix/name`), and with
//!   the names inside the top folder when the prefix holds no `/`;
//! * give every record back byte for byte, CRC verified, through `read`,
//!   `stored_slice`, `verify_record`, lookup by name and `read_many_into`;
//! * put every record's data on a 64-byte boundary (torch's alignment).
//!
//! What the writer cannot express is kept out of the inputs and listed in
//! fuzz/README.md: names over 65,535 bytes (the zip name field is 16 bits; the writer
//! does not check) and an empty record list (the reader refuses "no records").
//! Run: `cargo +nightly fuzz run container_writer` (see fuzz/README.md).
#![no_main]

use _fastserial::{Archive, ArchiveWriter, Error, MemorySource, ReadJob};
use libfuzzer_sys::fuzz_target;

/// At most this many records per input.
const MAX_RECORDS: usize = 48;
/// Generated big records: at most this many bytes (above the writer's 4 MiB threshold
/// for computing the CRC on a second thread).
const BIG: usize = 5 << 20;

/// Reads the fuzz input as a stream of small decisions; exhausted input reads as 0.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Characters names are built from: ASCII of every kind, separators, and multi-byte
/// UTF-8 (2, 3 and 4 bytes), including characters whose case folds outside ASCII.
#[rustfmt::skip]
const CHARS: &[char] = &[
    'a', 'A', 'z', 'Z', '0', '9', '/', '.', '_', '-', ' ', '\0', '\n', '\\', ':', '%', 'é',
    'É', 'ß', 'ſ', 'K', 'İ', 'ı', '€', '\u{feff}', '\u{202e}', '\u{ffff}', '😀', '\u{10ffff}',
];

fn name(inp: &mut Input<'_>, earlier: &[String]) -> String {
    let kind = inp.u8();
    match kind % 16 {
        // torch's own names
        0 => "data.pkl".into(),
        1 => format!("data/{}", inp.u16()),
        2 => ".data/version".into(),
        3 => "byteorder".into(),
        // an earlier name again, exactly or with its ASCII case changed
        4 | 5 if !earlier.is_empty() => {
            let e = &earlier[inp.u8() as usize % earlier.len()];
            if kind % 16 == 4 {
                e.clone()
            } else {
                let flip = inp.u8() as usize;
                e.chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if (i + flip) % 2 == 0 {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect()
            }
        }
        // a long name (up to ~4 KiB)
        6 => {
            let n = inp.u16() as usize % 4096;
            let c = CHARS[inp.u8() as usize % CHARS.len()];
            std::iter::repeat_n(c, n).collect()
        }
        // raw input bytes, lossily as UTF-8
        7 | 8 => {
            let n = inp.u8() as usize % 40;
            String::from_utf8_lossy(inp.bytes(n)).into_owned()
        }
        9 => String::new(),
        // built from the character table, often under data/
        _ => {
            let n = inp.u8() as usize % 24;
            let mut s = if kind & 0x10 != 0 {
                "data/".to_string()
            } else {
                String::new()
            };
            for _ in 0..n {
                s.push(CHARS[inp.u8() as usize % CHARS.len()]);
            }
            s
        }
    }
}

fn prefix(inp: &mut Input<'_>) -> String {
    match inp.u8() % 8 {
        0 => String::new(),
        1 => "a/b".into(),
        2 => {
            let n = inp.u8() as usize % 16;
            String::from_utf8_lossy(inp.bytes(n)).into_owned()
        }
        3 => "ARCHIVE".into(),
        4 => "ckpt.pt".into(),
        5 => "é€😀".into(),
        _ => "archive".into(),
    }
}

fn big_record(seed: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed as u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (len - v.len()).min(8);
        v.extend_from_slice(&x.to_le_bytes()[..n]);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input { data };
    let prefix = prefix(&mut inp);
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    let mut big_bytes = 0usize;
    while !inp.is_empty() && records.len() < MAX_RECORDS {
        let earlier: Vec<String> = records.iter().map(|r| r.0.clone()).collect();
        let n = name(&mut inp, &earlier);
        let how = inp.u8();
        let body = match how % 8 {
            0 => Vec::new(),
            // generated: a few KiB to a few MiB, at most one big one per input
            1 if how & 0x80 != 0 && big_bytes == 0 => {
                let len = if how & 0x40 != 0 {
                    BIG - (inp.u16() as usize)
                } else {
                    (inp.u16() as usize) << 4
                };
                big_bytes += len;
                big_record(inp.u8(), len)
            }
            _ => {
                let len = inp.u16() as usize % 2048;
                inp.bytes(len).to_vec()
            }
        };
        records.push((n, body));
    }
    if records.is_empty() {
        // The reader refuses an archive of no records ("the archive has no records").
        return;
    }

    let mut w = ArchiveWriter::new(Vec::new(), &prefix);
    for (n, body) in &records {
        let before = w.position();
        w.write_record(n, body)
            .expect("writing to a Vec cannot fail");
        assert!(w.position() >= before + 30 + body.len() as u64 + 16);
    }
    let id = w.serialization_id();
    assert!(
        id.len() == 40 && id.bytes().all(|c| c.is_ascii_digit()),
        "{id}"
    );
    let bytes = w.finish().expect("finishing into a Vec cannot fail");

    // What the reader should make of it: names relative to the top folder it sees (the
    // writer's prefix up to its first '/'), compared ignoring ASCII case.
    let full: Vec<String> = records
        .iter()
        .map(|(n, _)| format!("{prefix}/{n}"))
        .collect();
    let reader_prefix = full[0].split_once('/').map(|(p, _)| p).unwrap();
    let keys: Vec<String> = full
        .iter()
        .map(|f| f[reader_prefix.len() + 1..].to_ascii_lowercase())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    let colliding = sorted.windows(2).any(|w| w[0] == w[1]);

    let opened = Archive::open(Box::new(MemorySource(bytes.clone())));
    let archive = match opened {
        Ok(a) => {
            assert!(
                !colliding,
                "the reader opened an archive with names that collide ignoring case: {full:?}"
            );
            a
        }
        Err(Error::Ambiguous(msg)) if colliding => {
            assert!(msg.contains("two records are named") || msg.contains("differ only in case"));
            return;
        }
        Err(e) => panic!(
            "the reader refuses what the writer wrote ({} records, prefix {prefix:?}): {e}",
            records.len()
        ),
    };
    assert_eq!(archive.prefix(), reader_prefix);
    let got = archive.records();
    assert_eq!(got.len(), records.len());
    if !prefix.contains('/') {
        let names: Vec<&str> = records.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(archive.names(), names);
    }
    for (i, (rec, (n, body))) in got.iter().zip(&records).enumerate() {
        assert_eq!(rec.name, full[i]);
        assert_eq!(rec.size, body.len() as u64, "{n:?}");
        assert_eq!(rec.compressed_size, body.len() as u64, "{n:?}");
        assert_eq!(rec.crc32, crc32fast::hash(body), "{n:?}");
        assert_eq!(
            rec.data_offset % 64,
            0,
            "record {n:?} is not 64-byte aligned"
        );
        assert_eq!(
            &bytes[rec.data_offset as usize..][..body.len()],
            &body[..],
            "{n:?}"
        );
        assert_eq!(archive.stored_slice(rec), Some(&body[..]), "{n:?}");
        archive.verify_record(rec).expect("CRC of a written record");
        assert_eq!(&archive.read(rec, true).expect("read back")[..], &body[..]);
        let key = &full[i][reader_prefix.len() + 1..];
        assert_eq!(archive.index_of(key), Some(i), "lookup of {key:?}");
        assert_eq!(
            archive.index_of(&key.to_ascii_uppercase()),
            Some(i),
            "case-insensitive lookup of {key:?}"
        );
    }
    let mut bufs: Vec<Vec<u8>> = records.iter().map(|r| vec![0u8; r.1.len()]).collect();
    let jobs: Vec<ReadJob<'_>> = got
        .iter()
        .zip(bufs.iter_mut())
        .map(|(record, dst)| ReadJob {
            record,
            dst: &mut dst[..],
            swap: 0,
        })
        .collect();
    archive
        .read_many_into(jobs, 2, true)
        .expect("read_many_into of written records");
    for (b, (n, body)) in bufs.iter().zip(&records) {
        assert_eq!(b, body, "{n:?}");
    }
});
