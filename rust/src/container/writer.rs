//! Streams a checkpoint's zip container the way torch (miniz) writes it: STORED
//! records, each record's data aligned to 64 bytes with an `FB` padding extra field,
//! flag bit 3 with a data descriptor after the data, a central directory, and the
//! zip64 end records (always present, as torch writes them). Data goes straight to
//! the output: the archive is never assembled in memory.

use std::io::Write;

use super::spec::*;
use crate::error::{Error, Result};

/// A record begun by `ArchiveWriter::begin_external_record`, whose data the caller
/// writes.
#[derive(Clone, Debug)]
pub struct ExternalRecord {
    full: String,
    header_offset: u64,
    size: u64,
}

#[derive(Clone)]
struct CentralRecord {
    name: String,
    crc32: u32,
    size: u64,
    header_offset: u64,
}

/// Writes records one after another, then the directory on `finish`.
#[derive(Clone)]
pub struct ArchiveWriter<W: Write> {
    out: W,
    pos: u64,
    prefix: String,
    central: Vec<CentralRecord>,
    crc_of_crcs: crc32fast::Hasher,
}

/// Records at least this big get their CRC computed on a second thread while the
/// first one writes the bytes.
const PARALLEL_CRC_THRESHOLD: usize = 4 << 20;

fn needs_zip64(size: u64, header_offset: u64) -> bool {
    size >= U32_SENTINEL as u64 || header_offset >= U32_SENTINEL as u64
}

/// CRC32 of `data`, on the calling thread.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

impl<W: Write> ArchiveWriter<W> {
    /// `prefix` is the archive's top folder (torch: the file's stem, or `archive`).
    pub fn new(out: W, prefix: &str) -> Self {
        ArchiveWriter {
            out,
            pos: 0,
            prefix: prefix.to_string(),
            central: Vec::new(),
            crc_of_crcs: crc32fast::Hasher::new(),
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The output, as written so far (no directory).
    pub fn into_inner(self) -> W {
        self.out
    }

    fn emit(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(format!("writing {what}"), e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes one record; its CRC is computed here (on a second thread for big data).
    pub fn write_record(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let (full, header_offset) = self.begin_record(name, data.len() as u64)?;
        let crc = if data.len() >= PARALLEL_CRC_THRESHOLD {
            let out = &mut self.out;
            let (crc, written) = std::thread::scope(|s| {
                let h = s.spawn(|| crc32(data));
                let w = out.write_all(data);
                (h.join(), w)
            });
            written.map_err(|e| Error::io(format!("writing record '{full}'"), e))?;
            self.pos += data.len() as u64;
            crc.map_err(|_| Error::Usage("CRC thread panicked".into()))?
        } else {
            self.emit(data, &full)?;
            crc32(data)
        };
        self.end_record(full, header_offset, data.len() as u64, crc)
    }

    /// Writes the local header of a record whose `size` bytes of data the caller puts
    /// in the output itself, right after what this writer has written so far: they
    /// are counted, not written. `end_external_record` then writes the record's data
    /// descriptor with their CRC. (A shard file of a distributed checkpoint frames
    /// each tensor this way and writes the data from the tensor at its offset.)
    pub fn begin_external_record(&mut self, name: &str, size: u64) -> Result<ExternalRecord> {
        let (full, header_offset) = self.begin_record(name, size)?;
        self.pos += size;
        Ok(ExternalRecord {
            full,
            header_offset,
            size,
        })
    }

    /// Ends a record begun by `begin_external_record`, its data's CRC32 being `crc`.
    pub fn end_external_record(&mut self, record: ExternalRecord, crc: u32) -> Result<()> {
        self.end_record(record.full, record.header_offset, record.size, crc)
    }

    fn begin_record(&mut self, name: &str, size: u64) -> Result<(String, u64)> {
        let full = format!("{}/{}", self.prefix, name);
        if full.len() > u16::MAX as usize {
            // The zip headers hold a name's length in 16 bits.
            return Err(Error::Usage(format!(
                "record name of {} bytes: a zip record name is at most 65535 bytes",
                full.len()
            )));
        }
        let header = local_header(&full, size, self.pos);
        let header_offset = self.pos;
        self.emit(&header, &full)?;
        Ok((full, header_offset))
    }

    fn end_record(&mut self, full: String, header_offset: u64, size: u64, crc: u32) -> Result<()> {
        let mut desc = Vec::with_capacity(DATA_DESCRIPTOR_SIZE64);
        desc.put_u32(DATA_DESCRIPTOR_SIGNATURE);
        desc.put_u32(crc);
        if needs_zip64(size, header_offset) {
            desc.put_u64(size);
            desc.put_u64(size);
        } else {
            desc.put_u32(size as u32);
            desc.put_u32(size as u32);
        }
        self.emit(&desc, &full)?;
        self.crc_of_crcs.update(&crc.to_le_bytes());
        self.central.push(CentralRecord {
            name: full,
            crc32: crc,
            size,
            header_offset,
        });
        Ok(())
    }

    /// A 40-digit id for `.data/serialization_id`: a digest of every record's CRC
    /// followed by 20 random digits, so two saves of the same data still differ.
    pub fn serialization_id(&self) -> String {
        let digest = self.crc_of_crcs.clone().finalize() as u64;
        let random = random_u64() % 100_000_000_000_000_000_000u128 as u64;
        format!("{:020}{:020}", digest, random)
    }

    /// Writes the central directory and end records; returns the output.
    pub fn finish(mut self) -> Result<W> {
        let cd_offset = self.pos;
        let mut cd = Vec::with_capacity(self.central.len() * 80);
        for r in &self.central {
            let zip64 = needs_zip64(r.size, r.header_offset);
            let mut extra = Vec::new();
            if zip64 {
                let mut body = Vec::new();
                if r.size >= U32_SENTINEL as u64 {
                    body.put_u64(r.size);
                    body.put_u64(r.size);
                }
                if r.header_offset >= U32_SENTINEL as u64 {
                    body.put_u64(r.header_offset);
                }
                extra.put_u16(ZIP64_EXTRA_ID);
                extra.put_u16(body.len() as u16);
                extra.extend_from_slice(&body);
            }
            let clamp = |v: u64| {
                if v >= U32_SENTINEL as u64 {
                    U32_SENTINEL
                } else {
                    v as u32
                }
            };
            let size32 = clamp(r.size);
            cd.put_u32(CENTRAL_DIRECTORY_HEADER_SIGNATURE);
            cd.put_u16(0); // version made by (as torch writes)
            cd.put_u16(if zip64 { ZIP64_VERSION_NEEDED } else { 0 });
            cd.put_u16(FLAG_DATA_DESCRIPTOR | FLAG_UTF8);
            cd.put_u16(METHOD_STORED);
            cd.put_u16(0); // time
            cd.put_u16(0); // date
            cd.put_u32(r.crc32);
            cd.put_u32(size32);
            cd.put_u32(size32);
            cd.put_u16(r.name.len() as u16);
            cd.put_u16(extra.len() as u16);
            cd.put_u16(0); // comment
            cd.put_u16(0); // disk
            cd.put_u16(0); // internal attributes
            cd.put_u32(0); // external attributes
            cd.put_u32(clamp(r.header_offset));
            cd.extend_from_slice(r.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let cd_size = cd.len() as u64;
        self.emit(&cd, "central directory")?;

        let n = self.central.len() as u64;
        let zip64_eocd_offset = self.pos;
        let mut end = Vec::with_capacity(ZIP64_END_OF_CENTRAL_DIRECTORY_SIZE + 42);
        end.put_u32(ZIP64_END_OF_CENTRAL_DIRECTORY_SIGNATURE);
        end.put_u64((ZIP64_END_OF_CENTRAL_DIRECTORY_SIZE - 12) as u64);
        end.put_u16(ZIP64_VERSION_MADE_BY);
        end.put_u16(ZIP64_VERSION_NEEDED);
        end.put_u32(0);
        end.put_u32(0);
        end.put_u64(n);
        end.put_u64(n);
        end.put_u64(cd_size);
        end.put_u64(cd_offset);
        end.put_u32(ZIP64_END_OF_CENTRAL_DIRECTORY_LOCATOR_SIGNATURE);
        end.put_u32(0);
        end.put_u64(zip64_eocd_offset);
        end.put_u32(1);
        end.put_u32(END_OF_CENTRAL_DIRECTORY_SIGNATURE);
        end.put_u16(0);
        end.put_u16(0);
        let n16 = n.min(U16_SENTINEL as u64) as u16;
        end.put_u16(n16);
        end.put_u16(n16);
        end.put_u32(cd_size.min(U32_SENTINEL as u64) as u32);
        end.put_u32(cd_offset.min(U32_SENTINEL as u64) as u32);
        end.put_u16(0);
        self.emit(&end, "end of archive")?;
        self.out
            .flush()
            .map_err(|e| Error::io("flushing the archive", e))?;
        Ok(self.out)
    }
}

/// The local header for a record of `size` bytes at `offset`, with the zip64 extra
/// field when needed and the `FB` padding that puts the data on a 64-byte boundary
/// (the same arithmetic as torch's `getPadding`).
fn local_header(name: &str, size: u64, offset: u64) -> Vec<u8> {
    let zip64 = needs_zip64(size, offset);
    let mut zip64_extra = Vec::new();
    if zip64 {
        let mut body = Vec::new();
        if size >= U32_SENTINEL as u64 {
            body.put_u64(size);
            body.put_u64(size);
        }
        if offset >= U32_SENTINEL as u64 {
            body.put_u64(offset);
        }
        zip64_extra.put_u16(ZIP64_EXTRA_ID);
        zip64_extra.put_u16(body.len() as u16);
        zip64_extra.extend_from_slice(&body);
    }
    let start = offset + (LOCAL_FILE_HEADER_SIZE + name.len() + zip64_extra.len() + 4) as u64;
    let padding = (STORAGE_ALIGNMENT - start % STORAGE_ALIGNMENT) % STORAGE_ALIGNMENT;
    let extra_len = zip64_extra.len() + 4 + padding as usize;
    let mut h = Vec::with_capacity(LOCAL_FILE_HEADER_SIZE + name.len() + extra_len);
    h.put_u32(LOCAL_FILE_HEADER_SIGNATURE);
    h.put_u16(if zip64 { ZIP64_VERSION_NEEDED } else { 0 });
    h.put_u16(FLAG_DATA_DESCRIPTOR | FLAG_UTF8);
    h.put_u16(METHOD_STORED);
    h.put_u16(0); // time
    h.put_u16(0); // date
    h.put_u32(0); // crc: in the data descriptor
    h.put_u32(0); // compressed size: in the data descriptor
    h.put_u32(0); // size: in the data descriptor
    h.put_u16(name.len() as u16);
    h.put_u16(extra_len as u16);
    h.extend_from_slice(name.as_bytes());
    h.extend_from_slice(&zip64_extra);
    h.put_u16(PADDING_EXTRA_ID);
    h.put_u16(padding as u16);
    h.resize(h.len() + padding as usize, b'Z');
    h
}

/// 64 random bits from the OS, falling back to a time/address mix.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (&b as *const _ as u64).rotate_left(32) ^ (std::process::id() as u64) << 48
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::spec::Le;

    #[test]
    fn an_external_record_frames_data_written_elsewhere_byte_for_byte() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = ArchiveWriter::new(Vec::new(), "archive");
        whole.write_record("data.pkl", b"pickle").unwrap();
        whole.write_record("data/0", &data).unwrap();
        whole.write_record("version", b"3\n").unwrap();
        let whole = whole.finish().unwrap();

        let mut framed = ArchiveWriter::new(Vec::new(), "archive");
        framed.write_record("data.pkl", b"pickle").unwrap();
        let rec = framed
            .begin_external_record("data/0", data.len() as u64)
            .unwrap();
        let head = framed.out.len();
        framed.end_external_record(rec, crc32(&data)).unwrap();
        framed.write_record("version", b"3\n").unwrap();
        let framed = framed.finish().unwrap();
        let mut joined = framed[..head].to_vec();
        joined.extend_from_slice(&data);
        joined.extend_from_slice(&framed[head..]);
        assert_eq!(joined, whole);
        assert_eq!(head % 64, 0, "the data starts on torch's 64-byte alignment");
    }

    /// Parses a local header's zip64 extra, returning (size, offset) when present.
    fn zip64_fields(h: &[u8], name_len: usize) -> (Option<u64>, Option<u64>, usize) {
        let extra_len = u16::from_le_bytes([h[28], h[29]]) as usize;
        let mut r = Le::new(&h[LOCAL_FILE_HEADER_SIZE + name_len..][..extra_len]);
        let (mut size, mut offset) = (None, None);
        while r.remaining() >= 4 {
            let id = r.u16().unwrap();
            let len = r.u16().unwrap() as usize;
            let body = r.bytes(len).unwrap();
            if id == ZIP64_EXTRA_ID {
                let mut z = Le::new(body);
                if len >= 16 {
                    size = z.u64();
                    let _compressed = z.u64();
                }
                if len == 8 || len == 24 {
                    offset = z.u64();
                }
            }
        }
        (size, offset, extra_len)
    }

    #[test]
    fn local_headers_past_4_gib_carry_zip64_fields_and_stay_aligned() {
        let name = "archive/data/0";
        for (size, offset) in [
            (10u64, 5u64 << 30),
            (5u64 << 30, 100),
            (5u64 << 30, 6u64 << 30),
            (10, 4096),
        ] {
            let h = local_header(name, size, offset);
            let (z_size, z_offset, extra_len) = zip64_fields(&h, name.len());
            let big_size = size >= U32_SENTINEL as u64;
            let big_offset = offset >= U32_SENTINEL as u64;
            assert_eq!(
                z_size,
                big_size.then_some(size),
                "size {size} offset {offset}"
            );
            assert_eq!(
                z_offset,
                big_offset.then_some(offset),
                "size {size} offset {offset}"
            );
            assert_eq!(h.len(), LOCAL_FILE_HEADER_SIZE + name.len() + extra_len);
            // Data starts right after the header, on torch's 64-byte boundary.
            assert_eq!((offset + h.len() as u64) % STORAGE_ALIGNMENT, 0);
        }
    }
}
