//! Reads a checkpoint's zip container: end records (zip64 too), central directory,
//! local headers, and record data — STORED zero-copy or through `pread`, DEFLATE
//! decompressed. Every offset and size is checked against the source's length before
//! it is used, so a malformed archive is an `Error`, never a panic or a wild read.
//!
//! The archive is read as torch's own reader (miniz 3.0.2) reads it — the last end
//! record within its backward scan, so bytes appended after a checkpoint are fine;
//! zip64 fields over classic ones; names matched case-insensitively — and archives
//! that other zip readers would read differently are refused (`Error::Ambiguous`).

use rustc_hash::FxHashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use super::spec::*;
use crate::endian::byteswap_in_place;
use crate::error::{Error, Result};

/// Random-access bytes: a file read with `pread`, or memory (an mmap, a buffer).
pub trait Source: Send + Sync {
    fn len(&self) -> u64;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The whole source as memory, when it is memory-backed (zero-copy reads).
    fn as_slice(&self) -> Option<&[u8]> {
        None
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file read with positioned reads; never mapped, so a file truncated under us
/// gives an I/O error rather than SIGBUS.
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// The bytes `[start, start + len)` of a file, read as a source of their own: an
/// archive stored inside a larger file (a blob of a distributed-checkpoint shard).
pub struct FileWindow {
    file: File,
    start: u64,
    len: u64,
}

impl FileWindow {
    /// Fails with `UnexpectedEof` when the window does not lie inside the file.
    pub fn new(file: File, start: u64, len: u64) -> io::Result<Self> {
        let size = file.metadata()?.len();
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("bytes {start}..{start}+{len} lie outside the {size}-byte file"),
            ));
        }
        Ok(FileWindow { file, start, len })
    }
}

impl Source for FileWindow {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Reads stay inside the window: past its end is the end of this source.
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.file.read_exact_at(buf, self.start + offset),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Any owned memory (a `Vec`, an mmap, a Python buffer wrapped by the binding).
pub struct MemorySource<T: AsRef<[u8]> + Send + Sync>(pub T);

impl<T: AsRef<[u8]> + Send + Sync> Source for MemorySource<T> {
    fn len(&self) -> u64 {
        self.0.as_ref().len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = self.0.as_ref();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= src.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&src[start..end]);
        Ok(())
    }
    fn as_slice(&self) -> Option<&[u8]> {
        Some(self.0.as_ref())
    }
}

/// How a record's bytes are stored in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Stored,
    Deflated,
}

/// One record (zip entry) of the archive, with its data located.
#[derive(Debug, Clone)]
pub struct Record {
    /// Full entry name, top folder included.
    pub name: String,
    pub compression: Compression,
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
    pub header_offset: u64,
    /// File offset of the first data byte (resolved from the local header), or
    /// [`UNRESOLVED`] until then for archives opened with `open_deferring_data`: read
    /// it through [`Archive::offset_of`].
    pub data_offset: u64,
}

/// The `data_offset` of a record whose local header has not been read yet.
pub const UNRESOLVED: u64 = u64::MAX;

/// Limits that keep hostile archives from making us allocate or loop without bound.
pub const MAX_ENTRIES: u64 = 1 << 26;
/// Deflate's largest possible expansion (zlib's "1032:1" limit).
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Local headers of neighbouring records are read together, in windows of up to this
/// size, so many small records cost few reads. Small enough to stay in a core's L2
/// cache: copying the record area through it is most of opening a file of many
/// small records (1 MiB windows were 20-30% slower).
const HEADER_WINDOW: usize = 128 << 10;
/// Bytes read for one local header: the fixed part, the name and torch's padding.
const HEADER_SLACK: u64 = 512;

/// An opened checkpoint container.
pub struct Archive {
    source: Box<dyn Source>,
    records: Vec<Record>,
    /// Record index by name *without* the top folder (e.g. `data/0`).
    by_name: FxHashMap<String, usize>,
    /// `data/N` records by number N (index + 1; 0: none), for N below a bound:
    /// torch numbers storages, and a table lookup is much cheaper than hashing.
    by_number: Vec<u32>,
    prefix: String,
    cd_offset: u64,
    /// Whether some records' local headers were left unread (`open_deferring_data`).
    deferred: bool,
    /// Those records' data offsets, by record index, once read.
    late: std::sync::OnceLock<Vec<u64>>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("prefix", &self.prefix)
            .field("records", &self.records.len())
            .finish()
    }
}

fn malformed(msg: impl Into<String>) -> Error {
    Error::Malformed(msg.into())
}

fn read_vec(source: &dyn Source, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|e| e > source.len()) {
        return Err(malformed(format!(
            "{what} at offset {offset} (+{len} bytes) lies past the end of the file ({} bytes); the file is truncated or corrupted",
            source.len()
        )));
    }
    let mut buf = vec![0u8; len];
    source
        .read_exact_at(&mut buf, offset)
        .map_err(|e| Error::io(format!("reading {what}"), e))?;
    Ok(buf)
}

/// Zip64 values that replace 0xFFFF_FFFF fields, in the order the spec gives.
fn apply_zip64_extra(
    extra: &[u8],
    size: &mut u64,
    csize: &mut u64,
    offset: &mut u64,
    name: &str,
) -> Result<()> {
    let mut r = Le::new(extra);
    while r.remaining() >= 4 {
        let id = r.u16().unwrap_or(0);
        let len = r.u16().unwrap_or(0) as usize;
        let body = r
            .bytes(len)
            .ok_or_else(|| Error::bad_record(name, "extra field runs past its header"))?;
        if id != ZIP64_EXTRA_ID {
            continue;
        }
        let mut z = Le::new(body);
        let short = || Error::bad_record(name, "zip64 extra field is too short");
        if *size == U32_SENTINEL as u64 {
            *size = z.u64().ok_or_else(short)?;
        }
        if *csize == U32_SENTINEL as u64 {
            *csize = z.u64().ok_or_else(short)?;
        }
        if *offset == U32_SENTINEL as u64 {
            *offset = z.u64().ok_or_else(short)?;
        }
        return Ok(());
    }
    Ok(())
}

/// Where the end records put the central directory (zip64 values where present).
struct Directory {
    entries: u64,
    entries_here: u64,
    size: u64,
    offset: u64,
    disk: u32,
    cd_disk: u32,
    /// Where the end records begin (the zip64 end record's offset in a zip64 archive):
    /// the central directory must end exactly here.
    end: u64,
}

/// Finds and reads the end records as torch's reader (miniz 3.0.2, through
/// `PyTorchStreamReader`) does, refusing archives that other zip readers would read
/// differently:
///
/// * miniz takes the *last* end-record signature, within its backward scan
///   ([`miniz_scan_floor`]), that has 22 bytes after it; its comment length is not
///   checked, so bytes appended to a checkpoint do not stop torch from loading it.
///   A strict reader takes the record whose comment ends where the file ends (and
///   Go-style readers the last whose comment fits in the file): when such a record
///   is another one, the two read different archives.
/// * miniz reads the zip64 end record where the locator points and then uses *all*
///   its fields; readers that look right before the locator, or that consult zip64
///   fields only where the classic field is 0xFFFF / 0xFFFFFFFF, read others when
///   the records disagree.
fn locate_directory(source: &dyn Source) -> Result<Directory> {
    let len = source.len();
    let floor = miniz_scan_floor(len);
    // Also the whole stretch a strict reader searches (a comment spans < 64 KiB).
    let strict_floor = len.saturating_sub(MINIZ_SCAN_LIMIT);
    let lo = floor.min(strict_floor);
    let tail = read_vec(source, lo, (len - lo) as usize, "end of archive")?;
    let at = |p: u64| (p - lo) as usize;
    let signature = END_OF_CENTRAL_DIRECTORY_SIGNATURE.to_le_bytes();
    let is_end_record = |p: u64| tail[at(p)..at(p) + 4] == signature;
    // Where an end record at `p` says its comment ends.
    let comment_end = |p: u64| {
        let c = u16::from_le_bytes([tail[at(p) + 20], tail[at(p) + 21]]);
        p + (END_OF_CENTRAL_DIRECTORY_SIZE as u64) + c as u64
    };
    let last = len - END_OF_CENTRAL_DIRECTORY_SIZE as u64;
    let eocd_pos = (floor..=last)
        .rev()
        .find(|&p| is_end_record(p))
        .ok_or_else(|| {
            malformed(format!(
                "no end-of-central-directory record in the last {} bytes, where torch's reader looks: not a zip file, truncated, or followed by too many other bytes",
                len - floor
            ))
        })?;
    let ends = comment_end(eocd_pos);
    if ends != len {
        // Bytes follow the record's comment (or its comment runs past the end):
        // torch still reads this record. Does another reader take another one?
        let fits = ends <= len;
        let other = (strict_floor..eocd_pos).rev().find(|&p| {
            is_end_record(p) && {
                let e = comment_end(p);
                e == len || (!fits && e <= len)
            }
        });
        if let Some(other) = other {
            let why = if comment_end(other) == len {
                "whose comment ends where the file ends"
            } else {
                "the last whose comment fits in the file"
            };
            return Err(Error::Ambiguous(format!(
                "two end-of-central-directory records: torch's reader takes the last one (offset {eocd_pos}), other zip readers the one at offset {other}, {why}"
            )));
        }
    }
    let eocd = EndOfCentralDirectory::parse(&tail[at(eocd_pos)..])
        .ok_or_else(|| malformed("unreadable end-of-central-directory record"))?;
    let mut dir = Directory {
        entries: eocd.entries as u64,
        entries_here: eocd.entries_here as u64,
        size: eocd.cd_size as u64,
        offset: eocd.cd_offset as u64,
        disk: eocd.disk as u32,
        cd_disk: eocd.cd_disk as u32,
        end: eocd_pos,
    };

    // The zip64 locator, right before the classic record, when there is one.
    const LOC: u64 = ZIP64_END_OF_CENTRAL_DIRECTORY_LOCATOR_SIZE as u64;
    const Z64: u64 = ZIP64_END_OF_CENTRAL_DIRECTORY_SIZE as u64;
    let Some(loc_pos) = eocd_pos.checked_sub(LOC) else {
        return Ok(dir);
    };
    let bytes_at = |pos: u64, n: u64, what: &str| -> Result<std::borrow::Cow<'_, [u8]>> {
        if pos >= lo {
            Ok(std::borrow::Cow::Borrowed(
                &tail[at(pos)..at(pos) + n as usize],
            ))
        } else {
            read_vec(source, pos, n as usize, what).map(std::borrow::Cow::Owned)
        }
    };
    let Some(loc) = Zip64Locator::parse(&bytes_at(loc_pos, LOC, "zip64 locator")?) else {
        return Ok(dir);
    };
    let Some(z_pos) = loc_pos.checked_sub(Z64) else {
        return Err(malformed(format!(
            "zip64 locator at offset {loc_pos} leaves no room for the zip64 end record before it"
        )));
    };
    if loc.offset != z_pos {
        if loc.offset > len.saturating_sub(Z64) {
            return Err(malformed(format!(
                "zip64 end record offset {} is out of bounds",
                loc.offset
            )));
        }
        return Err(Error::Ambiguous(format!(
            "the zip64 locator points to offset {} for the zip64 end record, but it is not the record right before the locator (offset {z_pos}): torch's reader follows the pointer, readers that look right before the locator read another record",
            loc.offset
        )));
    }
    let z = Zip64EndOfCentralDirectory::parse(&bytes_at(z_pos, Z64, "zip64 end record")?)
        .ok_or_else(|| malformed("zip64 end record has a bad signature"))?;
    if loc.total_disks != 1 {
        return Err(malformed(format!(
            "the zip64 locator says the archive spans {} disks; torch reads single-file archives only",
            loc.total_disks
        )));
    }
    if z.record_size < Z64 - 12 {
        return Err(malformed(format!(
            "zip64 end record declares a size of {} bytes, less than its fixed fields",
            z.record_size
        )));
    }
    // Where the classic record holds a value (not the 0xFFFF / 0xFFFFFFFF that
    // defers to zip64), both records must say the same.
    let fields: [(&str, u64, u64, u64); 6] = [
        (
            "the number of records",
            dir.entries,
            U16_SENTINEL as u64,
            z.entries,
        ),
        (
            "the number of records on this disk",
            dir.entries_here,
            U16_SENTINEL as u64,
            z.entries_here,
        ),
        (
            "the central directory's size",
            dir.size,
            U32_SENTINEL as u64,
            z.cd_size,
        ),
        (
            "the central directory's offset",
            dir.offset,
            U32_SENTINEL as u64,
            z.cd_offset,
        ),
        (
            "the disk number",
            dir.disk as u64,
            U16_SENTINEL as u64,
            z.disk as u64,
        ),
        (
            "the central directory's disk",
            dir.cd_disk as u64,
            U16_SENTINEL as u64,
            z.cd_disk as u64,
        ),
    ];
    for (what, classic, sentinel, zip64) in fields {
        if classic != sentinel && classic != zip64 {
            return Err(Error::Ambiguous(format!(
                "the zip64 and classic end records disagree on {what} (zip64: {zip64}, classic: {classic}): torch's reader uses the zip64 value, readers that consult zip64 only for 0xFFFF fields the classic one"
            )));
        }
    }
    // torch's reader refuses directories over 4 GiB.
    if z.cd_size > u32::MAX as u64 {
        return Err(Error::LimitExceeded(format!(
            "a central directory of {} bytes (torch's reader reads at most 4 GiB)",
            z.cd_size
        )));
    }
    dir = Directory {
        entries: z.entries,
        entries_here: z.entries_here,
        size: z.cd_size,
        offset: z.cd_offset,
        disk: z.disk,
        cd_disk: z.cd_disk,
        end: z_pos,
    };
    Ok(dir)
}

impl Archive {
    /// Parses the container's directory from `source`.
    pub fn open(source: Box<dyn Source>) -> Result<Archive> {
        Self::open_with(source, false)
    }

    /// `open`, but the local headers of the `data/` records (tensor storages) of a
    /// file source are read only when a record's data is first needed, then all at
    /// once: a loader can read them on a worker thread, off its critical path
    /// (`resolve_deferred`). A bad one is reported then, naming its record.
    pub fn open_deferring_data(source: Box<dyn Source>) -> Result<Archive> {
        Self::open_with(source, true)
    }

    fn open_with(source: Box<dyn Source>, defer_data: bool) -> Result<Archive> {
        let len = source.len();
        if len < END_OF_CENTRAL_DIRECTORY_SIZE as u64 {
            return Err(malformed(format!(
                "the file is {len} bytes, too short to be a zip archive"
            )));
        }
        // 1-2. The end records, found and read as torch's reader reads them, refusing
        //      what other zip readers would read differently.
        let Directory {
            entries,
            entries_here,
            size: cd_size,
            offset: cd_offset,
            disk,
            cd_disk,
            end: cd_limit,
        } = locate_directory(&*source)?;

        // 3. The central directory must lie before the end records, and be able to
        //    hold the declared number of entries — checked before allocating for them.
        let cd_end = cd_offset
            .checked_add(cd_size)
            .filter(|&e| e <= cd_limit)
            .ok_or_else(|| {
                malformed(format!(
                    "central directory (offset {cd_offset}, {cd_size} bytes) lies outside the file; the file is truncated or corrupted"
                ))
            })?;
        if entries > MAX_ENTRIES || entries * CENTRAL_DIRECTORY_HEADER_SIZE as u64 > cd_size {
            return Err(Error::LimitExceeded(format!(
                "the archive declares {entries} entries, more than its {cd_size}-byte central directory can hold"
            )));
        }
        if entries == 0 {
            return Err(malformed("the archive has no records"));
        }
        // What torch's reader refuses: archives split over several disks.
        if entries_here != entries || ((disk | cd_disk) != 0 && (disk, cd_disk) != (1, 1)) {
            return Err(malformed(format!(
                "the end record describes a multi-disk archive ({entries_here} of {entries} records on disk {disk}, directory on disk {cd_disk}), which torch cannot read"
            )));
        }
        // Readers that allow for data prepended to an archive (Python's zipfile,
        // Info-ZIP) shift every offset by the bytes between the directory's declared
        // end and the end records; torch's reader does not.
        if cd_end != cd_limit {
            return Err(Error::Ambiguous(format!(
                "{} bytes lie between the central directory (ending at offset {cd_end}) and the end records (at offset {cd_limit}): readers that allow for data prepended to an archive shift every offset by that much, torch's reader does not",
                cd_limit - cd_end
            )));
        }
        let cd = read_vec(&*source, cd_offset, cd_size as usize, "central directory")?;

        let mut records = Vec::with_capacity(entries as usize);
        let mut pos = 0usize;
        for i in 0..entries {
            let head = cd
                .get(pos..pos + CENTRAL_DIRECTORY_HEADER_SIZE)
                .ok_or_else(|| {
                    malformed(format!(
                        "central directory entry {i} runs past the directory"
                    ))
                })?;
            let h = CentralHeader::parse(head).ok_or_else(|| {
                malformed(format!("central directory entry {i} has a bad signature"))
            })?;
            pos += CENTRAL_DIRECTORY_HEADER_SIZE;
            let var_len = h.name_len as usize + h.extra_len as usize + h.comment_len as usize;
            let var = cd.get(pos..pos + var_len).ok_or_else(|| {
                malformed(format!(
                    "central directory entry {i} runs past the directory"
                ))
            })?;
            pos += var_len;
            // Names are compared as bytes by torch's reader: a lossy conversion could
            // make two names one, or match a name that torch would not.
            let name = String::from_utf8(var[..h.name_len as usize].to_vec()).map_err(|e| {
                Error::bad_record(
                    String::from_utf8_lossy(e.as_bytes()),
                    "record name is not valid UTF-8",
                )
            })?;
            if h.disk_start == U16_SENTINEL || (h.disk_start as u32 != disk && h.disk_start != 1) {
                return Err(Error::bad_record(
                    &name,
                    format!(
                        "record starts on disk {}, another disk of a multi-disk archive",
                        h.disk_start
                    ),
                ));
            }
            let extra = &var[h.name_len as usize..h.name_len as usize + h.extra_len as usize];
            let mut size = h.uncompressed_size as u64;
            let mut csize = h.compressed_size as u64;
            let mut offset = h.local_header_offset as u64;
            apply_zip64_extra(extra, &mut size, &mut csize, &mut offset, &name)?;
            if h.flags & FLAG_ENCRYPTED != 0 {
                return Err(Error::bad_record(&name, "record is encrypted"));
            }
            let compression = match h.method {
                METHOD_STORED => Compression::Stored,
                METHOD_DEFLATED => Compression::Deflated,
                m => {
                    return Err(Error::bad_record(
                        &name,
                        format!(
                        "unsupported compression method {m} (only stored and deflate are readable)"
                    ),
                    ))
                }
            };
            if compression == Compression::Stored && csize != size {
                return Err(Error::bad_record(
                    &name,
                    format!("stored record declares {csize} bytes stored but {size} bytes of data"),
                ));
            }
            // Deflate cannot expand data more than MAX_DEFLATE_RATIO times, so a larger
            // declared size is a lie; refusing it here bounds every later allocation
            // by the file's own size.
            if compression == Compression::Deflated
                && size > csize.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(64)
            {
                return Err(Error::bad_record(
                    &name,
                    format!(
                        "declares {size} bytes of data, more than its {csize} compressed bytes can hold"
                    ),
                ));
            }
            records.push(Record {
                name,
                compression,
                crc32: h.crc32,
                compressed_size: csize,
                size,
                header_offset: offset,
                data_offset: 0,
            });
        }
        // Readers that read the directory to its declared end (Python's zipfile)
        // would find records here that torch's reader, which reads the declared
        // number of entries, does not.
        if pos as u64 != cd_size {
            return Err(Error::Ambiguous(format!(
                "the central directory holds {} bytes after its {entries} declared entries: readers that read the whole directory see records torch's reader does not",
                cd_size - pos as u64
            )));
        }

        // 4. Names, relative to the archive's single top folder.
        let prefix = match records[0].name.split_once('/') {
            Some((p, _)) => p.to_string(),
            None => {
                return Err(malformed(format!(
                    "first record '{}' is not inside a top folder; not a torch checkpoint",
                    records[0].name
                )))
            }
        };
        // torch's reader looks names up case-insensitively (ASCII), so the index is
        // keyed by lower-cased names: two records that fold to one name are refused
        // (torch may read either), and a lookup finds what torch's finds. Every
        // record must lie inside the top folder, as torch.load requires.
        let name_index = |records: &[Record]| -> Result<(FxHashMap<String, usize>, Vec<u32>)> {
            let mut by_name: FxHashMap<String, usize> =
                FxHashMap::with_capacity_and_hasher(records.len(), Default::default());
            let mut by_number = vec![0u32; number_bound(records.len())];
            let plen = prefix.len() + 1;
            for (i, r) in records.iter().enumerate() {
                let inside = r.name.len() >= plen
                    && r.name.as_bytes()[prefix.len()] == b'/'
                    && r.name.starts_with(&prefix);
                if !inside {
                    return Err(Error::bad_record(
                        &r.name,
                        format!(
                            "record is not inside the archive's top folder '{prefix}/' (torch refuses such archives)"
                        ),
                    ));
                }
                let key = fold_case(&r.name[plen..]).into_owned();
                let number = key.strip_prefix("data/").and_then(storage_number);
                if let Some(slot) = number.and_then(|n| by_number.get_mut(n)) {
                    *slot = u32::try_from(i + 1).unwrap_or(0);
                }
                match by_name.entry(key) {
                    std::collections::hash_map::Entry::Occupied(first) => {
                        return Err(same_name(&records[*first.get()], r));
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                }
            }
            Ok((by_name, by_number))
        };

        // 5. Local headers: data starts after the header's own name and extra field.
        //    Many records: the name index is built meanwhile, on a thread of its own.
        let data_dir = format!("{prefix}/data/");
        let defer = |r: &Record| defer_data && r.name.starts_with(&data_dir);
        let now: Vec<usize> = if defer_data && source.as_slice().is_none() {
            (0..records.len())
                .filter(|&i| !defer(&records[i]))
                .collect()
        } else {
            (0..records.len()).collect()
        };
        let deferred = now.len() < records.len();
        // Only many headers use threads (default_threads() reads cgroup files).
        let threads = if now.len() >= PARALLEL_OPEN_MIN {
            default_threads()
        } else {
            1
        };
        let (by_name, by_number) = if records.len() >= PARALLEL_OPEN_MIN {
            let offsets = std::thread::scope(|scope| {
                let shared: &[Record] = &records;
                let index = scope.spawn(move || name_index(shared));
                let offsets = data_offsets(&*source, shared, now, cd_offset, threads);
                (offsets, index.join())
            });
            match offsets {
                (offsets, Ok(index)) => {
                    // A name clash is reported first: it says more than a bad header.
                    let index = index?;
                    apply_data_offsets(&mut records, offsets?);
                    index
                }
                (_, Err(panic)) => std::panic::resume_unwind(panic),
            }
        } else {
            let index = name_index(&records)?;
            let offsets = data_offsets(&*source, &records, now, cd_offset, threads)?;
            apply_data_offsets(&mut records, offsets);
            index
        };
        if deferred {
            for r in records.iter_mut().filter(|r| defer(r)) {
                // What the central directory alone can check now: the data, which
                // starts after at least the header and name, fits the record area (a
                // record declaring more than the file holds is refused at open).
                let min_start = r
                    .header_offset
                    .checked_add((LOCAL_FILE_HEADER_SIZE + r.name.len()) as u64);
                if min_start
                    .and_then(|m| m.checked_add(r.compressed_size))
                    .is_none_or(|end| end > cd_offset)
                {
                    return Err(Error::bad_record(
                        &r.name,
                        format!(
                            "data (local header at offset {}, {} bytes) runs past the end of the record area; the file is truncated or corrupted",
                            r.header_offset, r.compressed_size
                        ),
                    ));
                }
                r.data_offset = UNRESOLVED;
            }
        }
        // 6. No record's bytes may overlap another's. (Records not resolved yet are
        //    checked with the least they span now, and exactly once resolved.)
        check_disjoint(&records, |i| {
            let r = &records[i];
            if r.data_offset == UNRESOLVED {
                r.header_offset + (LOCAL_FILE_HEADER_SIZE + r.name.len()) as u64 + r.compressed_size
            } else {
                r.data_offset + r.compressed_size
            }
        })?;
        Ok(Archive {
            source,
            records,
            by_name,
            by_number,
            prefix,
            cd_offset,
            deferred,
            late: std::sync::OnceLock::new(),
        })
    }

    /// Reads the local headers `open_deferring_data` left unread, on up to `threads`
    /// threads (once; later calls return at once).
    pub fn resolve_deferred(&self, threads: usize) -> Result<()> {
        if !self.deferred || self.late.get().is_some() {
            return Ok(());
        }
        let which: Vec<usize> = (0..self.records.len())
            .filter(|&i| self.records[i].data_offset == UNRESOLVED)
            .collect();
        let offsets = data_offsets(&*self.source, &self.records, which, self.cd_offset, threads)?;
        let mut late = vec![UNRESOLVED; self.records.len()];
        for (i, offset) in offsets {
            late[i] = offset;
        }
        check_disjoint(&self.records, |i| {
            let r = &self.records[i];
            let offset = match r.data_offset {
                UNRESOLVED => late[i],
                offset => offset,
            };
            offset + r.compressed_size
        })?;
        let _ = self.late.set(late);
        Ok(())
    }

    /// The file offset of a record's first data byte, reading the deferred local
    /// headers first when it is one of them. `rec` must be one of `records()`.
    pub fn offset_of(&self, rec: &Record) -> Result<u64> {
        if rec.data_offset != UNRESOLVED {
            return Ok(rec.data_offset);
        }
        if self.late.get().is_none() {
            // (Not default_threads() on every call: it reads cgroup files.)
            self.resolve_deferred(default_threads())?;
        }
        // The record's index, from its address within `records` (no unsafe needed).
        let base = self.records.as_ptr() as usize;
        let at = (rec as *const Record as usize).wrapping_sub(base);
        let size = std::mem::size_of::<Record>();
        let offset = (at % size == 0)
            .then(|| at / size)
            .and_then(|i| self.late.get()?.get(i).copied())
            .filter(|&o| o != UNRESOLVED);
        offset.ok_or_else(|| Error::Usage(format!("record '{}' is not in this archive", rec.name)))
    }

    /// The archive's top folder name (`archive` for buffers, the file stem for paths).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn source(&self) -> &dyn Source {
        &*self.source
    }

    /// Looks a record up by its name inside the top folder (`data.pkl`, `data/3`).
    ///
    /// Names match as in torch's reader: ASCII letters in either case.
    pub fn get(&self, name: &str) -> Option<&Record> {
        self.index_of(name).map(|i| &self.records[i])
    }

    /// The index in `records()` of the record named `name` inside the top folder.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(fold_case(name).as_ref()).copied()
    }

    /// The index of record `data/KEY` when KEY is a number (torch's storage keys):
    /// `Some(found)`, or `None` when `index_of("data/KEY")` must decide.
    pub fn storage_by_number(&self, key: &str) -> Option<Option<usize>> {
        let n = storage_number(key)?;
        let i = *self.by_number.get(n)?;
        Some(i.checked_sub(1).map(|i| i as usize))
    }

    pub fn require(&self, name: &str) -> Result<&Record> {
        self.get(name)
            .ok_or_else(|| Error::MissingRecord(format!("{}/{}", self.prefix, name)))
    }

    /// Names inside the top folder, in archive order.
    pub fn names(&self) -> Vec<&str> {
        let plen = self.prefix.len() + 1;
        self.records
            .iter()
            // `get`, not slicing: another record's name may have a multi-byte
            // character across the prefix length.
            .filter_map(|r| r.name.get(plen..))
            .collect()
    }

    /// The record's stored bytes, zero-copy, when the source is memory and the record
    /// is not compressed.
    pub fn stored_slice(&self, rec: &Record) -> Option<&[u8]> {
        if rec.compression != Compression::Stored {
            return None;
        }
        let mem = self.source.as_slice()?;
        let start = usize::try_from(self.offset_of(rec).ok()?).ok()?;
        mem.get(start..start.checked_add(usize::try_from(rec.size).ok()?)?)
    }

    /// Reads a whole record into a new vector (small records: the pickle, metadata).
    pub fn read(&self, rec: &Record, verify_crc: bool) -> Result<Vec<u8>> {
        let len = usize::try_from(rec.size)
            .map_err(|_| Error::bad_record(&rec.name, "record too large for this machine"))?;
        if rec.compression == Compression::Stored && rec.size > self.source.len() {
            return Err(Error::bad_record(
                &rec.name,
                format!("declares {} bytes, more than the whole file", rec.size),
            ));
        }
        // A failed allocation is an error to report, not a process abort.
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| {
            Error::bad_record(&rec.name, format!("cannot allocate {len} bytes to read it"))
        })?;
        buf.resize(len, 0);
        self.read_into(rec, &mut buf, verify_crc)?;
        Ok(buf)
    }

    /// Reads a record's (decompressed) bytes into `dst`, which must be exactly its size.
    pub fn read_into(&self, rec: &Record, dst: &mut [u8], verify_crc: bool) -> Result<()> {
        if dst.len() as u64 != rec.size {
            return Err(Error::bad_record(
                &rec.name,
                format!(
                    "record holds {} bytes but {} were expected",
                    rec.size,
                    dst.len()
                ),
            ));
        }
        match rec.compression {
            Compression::Stored => {
                self.source
                    .read_exact_at(dst, self.offset_of(rec)?)
                    .map_err(|e| Error::io(format!("reading record '{}'", rec.name), e))?;
            }
            Compression::Deflated => self.inflate_into(rec, dst)?,
        }
        if verify_crc {
            check_crc(rec, dst)?;
        }
        Ok(())
    }

    fn inflate_into(&self, rec: &Record, dst: &mut [u8]) -> Result<()> {
        let at = self.offset_of(rec)?;
        let compressed = match self.source.as_slice() {
            Some(mem) => {
                std::borrow::Cow::Borrowed(&mem[at as usize..(at + rec.compressed_size) as usize])
            }
            None => std::borrow::Cow::Owned(read_vec(
                &*self.source,
                at,
                usize::try_from(rec.compressed_size).map_err(|_| {
                    Error::bad_record(&rec.name, "compressed record too large for this machine")
                })?,
                &format!("record '{}'", rec.name),
            )?),
        };
        let mut dec = flate2::read::DeflateDecoder::new(&compressed[..]);
        dec.read_exact(dst)
            .map_err(|e| Error::bad_record(&rec.name, format!("deflate data is corrupted: {e}")))?;
        let mut probe = [0u8; 1];
        if dec.read(&mut probe).unwrap_or(0) != 0 {
            return Err(Error::bad_record(
                &rec.name,
                "deflate data decompresses to more bytes than the record declares",
            ));
        }
        Ok(())
    }

    /// Reads many records into caller buffers on `threads` threads, swapping bytes
    /// to native order by `swap` element size (0 or 1: none). Big records are split
    /// into pieces so one huge tensor still uses every thread.
    pub fn read_many_into(
        &self,
        jobs: Vec<ReadJob<'_>>,
        threads: usize,
        verify_crc: bool,
    ) -> Result<()> {
        const PIECE: usize = 8 << 20;
        self.resolve_deferred(threads)?;
        let mut pieces: Vec<Piece<'_>> = Vec::new();
        for job in jobs {
            let rec = job.record;
            let at = self.offset_of(rec)?;
            if job.dst.len() as u64 != rec.size {
                return Err(Error::bad_record(
                    &rec.name,
                    format!(
                        "record holds {} bytes but the pickle declares {}",
                        rec.size,
                        job.dst.len()
                    ),
                ));
            }
            // Whole-record pieces when we must see all bytes at once (CRC, deflate).
            if rec.compression == Compression::Deflated || verify_crc || job.dst.len() <= PIECE {
                pieces.push(Piece {
                    record: rec,
                    at,
                    offset: 0,
                    dst: job.dst,
                    swap: job.swap,
                    whole: true,
                });
            } else {
                let mut off = 0u64;
                for chunk in job.dst.chunks_mut(PIECE) {
                    let n = chunk.len() as u64;
                    pieces.push(Piece {
                        record: rec,
                        at,
                        offset: off,
                        dst: chunk,
                        swap: job.swap,
                        whole: false,
                    });
                    off += n;
                }
            }
        }
        let work = self.coalesce(pieces);
        // A few megabytes read as fast on this thread alone, with no thread to start
        // (a 4 MiB checkpoint of 16 tensors: p50 1.27 ms on one thread, 1.55 ms on two).
        const MIN_BYTES_PER_THREAD: usize = 8 << 20;
        let total: usize = work.iter().map(|w| w.bytes()).sum();
        let threads = threads
            .max(1)
            .min(work.len().max(1))
            .min(total / MIN_BYTES_PER_THREAD + 1);
        if threads <= 1 {
            let mut scratch = Vec::new();
            return work
                .into_iter()
                .try_for_each(|w| self.run_work(w, verify_crc, &mut scratch));
        }
        // Greedy balance by bytes: biggest unit to the least-loaded thread.
        let mut work = work;
        work.sort_by_key(|w| std::cmp::Reverse(w.bytes()));
        let mut lanes: Vec<(usize, Vec<Work<'_>>)> =
            (0..threads).map(|_| (0, Vec::new())).collect();
        for w in work {
            let lane = lanes.iter_mut().min_by_key(|l| l.0).expect("threads >= 1");
            lane.0 += w.bytes();
            lane.1.push(w);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|(_, lane)| {
                    s.spawn(move || {
                        let mut scratch = Vec::new();
                        lane.into_iter()
                            .try_for_each(|w| self.run_work(w, verify_crc, &mut scratch))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Usage("reader thread panicked".into())))
                })
                .collect::<Result<Vec<()>>>()
                .map(|_| ())
        })
    }

    /// Groups small stored records that lie close together in a file, so each group
    /// costs one `pread` instead of one per record (20,000 small tensors: a handful
    /// of reads instead of 20,000 system calls). Memory sources need no grouping.
    fn coalesce<'a>(&self, pieces: Vec<Piece<'a>>) -> Vec<Work<'a>> {
        /// Records up to this size are grouped.
        const SMALL: usize = 256 << 10;
        /// Bytes between neighbours worth reading through (zip headers, padding).
        const GAP: u64 = 4 << 10;
        /// The largest span one group reads.
        const SPAN: u64 = 1 << 20;
        if self.source.as_slice().is_some() {
            return pieces.into_iter().map(Work::One).collect();
        }
        let (mut small, big): (Vec<Piece<'a>>, Vec<Piece<'a>>) =
            pieces.into_iter().partition(|p| {
                p.whole && p.record.compression == Compression::Stored && p.dst.len() <= SMALL
            });
        let mut work: Vec<Work<'a>> = big.into_iter().map(Work::One).collect();
        small.sort_by_key(|p| p.at);
        let mut group: Vec<Piece<'a>> = Vec::new();
        let (mut start, mut end) = (0u64, 0u64);
        for p in small {
            let (off, len) = (p.at, p.record.size);
            let fits = !group.is_empty()
                && off >= end
                && off - end <= GAP
                && (off + len).saturating_sub(start) <= SPAN;
            if !fits && !group.is_empty() {
                work.push(Work::Group {
                    start,
                    end,
                    pieces: std::mem::take(&mut group),
                });
            }
            if group.is_empty() {
                start = off;
            }
            end = off.saturating_add(len);
            group.push(p);
        }
        if !group.is_empty() {
            work.push(Work::Group {
                start,
                end,
                pieces: group,
            });
        }
        work
    }

    fn run_work(&self, w: Work<'_>, verify_crc: bool, scratch: &mut Vec<u8>) -> Result<()> {
        let (start, end, pieces) = match w {
            Work::One(p) => return self.read_piece(p, verify_crc),
            Work::Group { pieces, .. } if pieces.len() == 1 => {
                return pieces
                    .into_iter()
                    .try_for_each(|p| self.read_piece(p, verify_crc));
            }
            Work::Group { start, end, pieces } => (start, end, pieces),
        };
        let span = (end - start) as usize;
        scratch.clear();
        scratch.resize(span, 0);
        if self.source.read_exact_at(scratch, start).is_err() {
            // Read them one by one, so the error names the record that failed.
            return pieces
                .into_iter()
                .try_for_each(|p| self.read_piece(p, verify_crc));
        }
        for p in pieces {
            let at = (p.at - start) as usize;
            p.dst.copy_from_slice(&scratch[at..at + p.dst.len()]);
            if verify_crc {
                check_crc(p.record, p.dst)?;
            }
            if p.swap > 1 {
                byteswap_in_place(p.dst, p.swap)
                    .map_err(|m| Error::bad_record(&p.record.name, m))?;
            }
        }
        Ok(())
    }

    fn read_piece(&self, p: Piece<'_>, verify_crc: bool) -> Result<()> {
        crate::storage::prefault_for_write(p.dst);
        if p.whole {
            self.read_into(p.record, p.dst, verify_crc)?;
        } else {
            self.source
                .read_exact_at(p.dst, p.at + p.offset)
                .map_err(|e| Error::io(format!("reading record '{}'", p.record.name), e))?;
        }
        if p.swap > 1 {
            byteswap_in_place(p.dst, p.swap).map_err(|m| Error::bad_record(&p.record.name, m))?;
        }
        Ok(())
    }

    /// Checks one record's CRC32 against the central directory.
    pub fn verify_record(&self, rec: &Record) -> Result<()> {
        if let Some(bytes) = self.stored_slice(rec) {
            return check_crc(rec, bytes);
        }
        // Stream through a bounded buffer so verifying a huge record stays small.
        if rec.compression == Compression::Stored {
            let at = self.offset_of(rec)?;
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; (4usize << 20).min(rec.size as usize)];
            let mut off = 0u64;
            while off < rec.size {
                let n = ((rec.size - off) as usize).min(buf.len());
                self.source
                    .read_exact_at(&mut buf[..n], at + off)
                    .map_err(|e| Error::io(format!("reading record '{}'", rec.name), e))?;
                hasher.update(&buf[..n]);
                off += n as u64;
            }
            let got = hasher.finalize();
            if got != rec.crc32 {
                return Err(crc_error(rec, got));
            }
            return Ok(());
        }
        self.read(rec, true).map(|_| ())
    }
}

/// One record to read into a caller buffer, with the element size to byte-swap by.
pub struct ReadJob<'a> {
    pub record: &'a Record,
    pub dst: &'a mut [u8],
    pub swap: usize,
}

/// A unit of reading work for one thread.
enum Work<'a> {
    One(Piece<'a>),
    /// Small records read with one `pread` of `start..end` (they lie inside it).
    Group {
        start: u64,
        end: u64,
        pieces: Vec<Piece<'a>>,
    },
}

impl Work<'_> {
    fn bytes(&self) -> usize {
        match self {
            Work::One(p) => p.dst.len(),
            Work::Group { start, end, .. } => (end - start) as usize,
        }
    }
}

struct Piece<'a> {
    record: &'a Record,
    /// The record's data offset in the file.
    at: u64,
    offset: u64,
    dst: &'a mut [u8],
    swap: usize,
    whole: bool,
}

fn crc_error(rec: &Record, got: u32) -> Error {
    Error::bad_record(
        &rec.name,
        format!(
            "CRC32 mismatch (archive says {:08x}, data gives {got:08x}): the data is corrupted",
            rec.crc32
        ),
    )
}

fn check_crc(rec: &Record, bytes: &[u8]) -> Result<()> {
    let got = crc32fast::hash(bytes);
    if got != rec.crc32 {
        return Err(crc_error(rec, got));
    }
    Ok(())
}

/// `name` with ASCII letters lower-cased, as torch's reader (miniz's `MZ_TOLOWER`)
/// compares names; borrowed when it has no upper-case letter (torch's own names).
fn fold_case(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|c| c.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// The refusal of two records whose names torch's reader cannot tell apart.
fn same_name(first: &Record, second: &Record) -> Error {
    if first.name == second.name {
        Error::Ambiguous(format!(
            "two records are named '{}': torch's reader may read either one",
            first.name
        ))
    } else {
        Error::Ambiguous(format!(
            "records '{}' and '{}' have names that differ only in case: torch's reader matches names case-insensitively and may read either one",
            first.name, second.name
        ))
    }
}

/// Refuses records whose bytes (local header through data) overlap another's: each
/// reader then reads shared bytes as parts of different records. `end` is where a
/// record's bytes end, by index. torch writes records in directory order, so for its
/// files this is one pass over the records, without sorting.
fn check_disjoint(records: &[Record], end: impl Fn(usize) -> u64) -> Result<()> {
    let check = |a: usize, b: usize| -> Result<()> {
        let (ra, rb) = (&records[a], &records[b]);
        let a_end = end(a);
        if rb.header_offset < a_end {
            return Err(Error::Ambiguous(format!(
                "records '{}' (offsets {}..{a_end}) and '{}' (from offset {}) overlap",
                ra.name, ra.header_offset, rb.name, rb.header_offset
            )));
        }
        Ok(())
    };
    // One pass while the records lie in file order (an overlap between neighbours
    // in directory order is an overlap in any order); a sort only if they do not.
    let mut sorted = true;
    for b in 1..records.len() {
        if records[b - 1].header_offset >= records[b].header_offset {
            sorted = false;
            break;
        }
        check(b - 1, b)?;
    }
    if sorted {
        return Ok(());
    }
    let mut order: Vec<(u64, u32)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.header_offset, i as u32))
        .collect();
    order.sort_unstable();
    order
        .windows(2)
        .try_for_each(|w| check(w[0].1 as usize, w[1].1 as usize))
}

/// Archives with at least this many records resolve their local headers on several
/// threads, and index their names meanwhile.
const PARALLEL_OPEN_MIN: usize = 4096;

/// The number a storage key spells in canonical decimal ("0", "17"; not "007" or
/// "+1", which name other records).
fn storage_number(key: &str) -> Option<usize> {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > 9 || (b[0] == b'0' && b.len() > 1) {
        return None;
    }
    b.iter().try_fold(0usize, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + (c - b'0') as usize)
    })
}

/// Storage numbers below this are indexed by `Archive::by_number`: a few times the
/// record count covers torch's numbering, and bounds the table by the archive.
fn number_bound(records: usize) -> usize {
    records.saturating_mul(4).saturating_add(16)
}

/// Threads for reading local headers: the cores available, at most 4.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// The data offsets of records `which`, from their local headers, as `(record,
/// offset)`. Headers are read through a window, so thousands of small neighbouring
/// records cost a handful of reads. Many records are split into runs of neighbouring
/// headers, resolved on up to `threads` threads; the error reported is still the
/// first in file order.
fn data_offsets(
    source: &dyn Source,
    records: &[Record],
    which: Vec<usize>,
    cd_offset: u64,
    threads: usize,
) -> Result<Vec<(usize, u64)>> {
    let mut order = which;
    order.sort_by_key(|&i| records[i].header_offset);
    let starts: Vec<u64> = order.iter().map(|&i| records[i].header_offset).collect();
    let threads = if source.as_slice().is_none() && order.len() >= PARALLEL_OPEN_MIN {
        threads.max(1)
    } else {
        1
    };
    let chunk = order.len().div_ceil(threads).max(1);
    let results: Vec<Result<Vec<u64>>> = if threads <= 1 {
        vec![resolve_run(source, records, &order, &starts, cd_offset)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = order
                .chunks(chunk)
                .zip(starts.chunks(chunk))
                .map(|(o, st)| scope.spawn(move || resolve_run(source, records, o, st, cd_offset)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };
    let mut out = Vec::with_capacity(order.len());
    for (run, result) in order.chunks(chunk).zip(results) {
        out.extend(run.iter().copied().zip(result?));
    }
    Ok(out)
}

fn apply_data_offsets(records: &mut [Record], offsets: Vec<(usize, u64)>) {
    for (i, offset) in offsets {
        records[i].data_offset = offset;
    }
}

/// The data offsets of `records[order[k]]`, whose local headers start at `starts[k]`
/// (ascending), in that order.
fn resolve_run(
    source: &dyn Source,
    records: &[Record],
    order: &[usize],
    starts: &[u64],
    cd_offset: u64,
) -> Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(order.len());
    let mem = source.as_slice();
    let mut window: Vec<u8> = Vec::new();
    let mut window_start = 0u64;
    let mut name_buf: Vec<u8> = Vec::new();
    for (position, &i) in order.iter().enumerate() {
        let rec = &records[i];
        let h = rec.header_offset;
        let fixed_end = h.checked_add(LOCAL_FILE_HEADER_SIZE as u64);
        if fixed_end.is_none_or(|e| e > cd_offset) {
            let place = if h >= source.len() {
                "outside the file"
            } else {
                "outside the record area (it must precede the central directory)"
            };
            return Err(Error::bad_record(
                &rec.name,
                format!("local header offset {h} lies {place}; the file is corrupted"),
            ));
        }
        // The bytes start..start+n of a local header: from memory, or from a window
        // read once for many neighbouring headers (its buffer reused across windows).
        let mut header_bytes = |start: u64, dst: &mut [u8]| -> Result<()> {
            let n = dst.len();
            if let Some(m) = mem {
                dst.copy_from_slice(&m[start as usize..start as usize + n]);
                return Ok(());
            }
            let in_window =
                start >= window_start && start + n as u64 <= window_start + window.len() as u64;
            if !in_window {
                // Cover the following headers that lie within HEADER_WINDOW (many small
                // records: one read for many headers), but never read across a big
                // record's data just to reach the next header.
                let mut end = start + (n as u64).max(HEADER_SLACK);
                for &next in &starts[position + 1..] {
                    if next + HEADER_SLACK > start + HEADER_WINDOW as u64 {
                        break;
                    }
                    end = end.max(next + HEADER_SLACK);
                }
                let want = (end.min(cd_offset) - start) as usize;
                if start + want as u64 > source.len() {
                    // What read_vec reports: a truncated file.
                    return read_vec(source, start, want, "local header").map(|_| ());
                }
                window.resize(want, 0);
                if source.read_exact_at(&mut window, start).is_err() {
                    // The window may reach past a file that shrank since it was opened:
                    // read just this header, so an error names the record it is of.
                    window.clear();
                    return source.read_exact_at(dst, start).map_err(|e| {
                        Error::io(
                            format!("reading the local header of record '{}'", rec.name),
                            e,
                        )
                    });
                }
                window_start = start;
            }
            let off = (start - window_start) as usize;
            dst.copy_from_slice(&window[off..off + n]);
            Ok(())
        };
        let mut fixed = [0u8; LOCAL_FILE_HEADER_SIZE];
        header_bytes(h, &mut fixed)?;
        let mut r = Le::new(&fixed);
        if r.u32() != Some(LOCAL_FILE_HEADER_SIGNATURE) {
            return Err(Error::bad_record(
                &rec.name,
                format!("no local header at offset {h}; the file is corrupted"),
            ));
        }
        let mut skip = Le::new(&fixed[26..]);
        let name_len = skip.u16().unwrap_or(0) as u64;
        let extra_len = skip.u16().unwrap_or(0) as u64;
        let data_offset = h + LOCAL_FILE_HEADER_SIZE as u64 + name_len + extra_len;
        let name_end = h + LOCAL_FILE_HEADER_SIZE as u64 + name_len;
        if name_end > cd_offset {
            return Err(Error::bad_record(
                &rec.name,
                "local header runs past the record area",
            ));
        }
        name_buf.resize(name_len as usize, 0);
        header_bytes(h + LOCAL_FILE_HEADER_SIZE as u64, &mut name_buf)?;
        if name_buf != rec.name.as_bytes() {
            return Err(Error::bad_record(
                &rec.name,
                "local header names a different record than the central directory",
            ));
        }
        let end = data_offset.checked_add(rec.compressed_size);
        if end.is_none_or(|e| e > cd_offset) {
            return Err(Error::bad_record(
                &rec.name,
                format!(
                    "data (offset {data_offset}, {} bytes) runs past the end of the record area; the file is truncated or corrupted",
                    rec.compressed_size
                ),
            ));
        }
        offsets.push(data_offset);
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::writer::ArchiveWriter;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A file-like source (no zero-copy slice) that counts the bytes read from it,
    /// and the reads.
    struct CountingSource {
        bytes: Vec<u8>,
        read: Arc<AtomicU64>,
        calls: Arc<AtomicU64>,
    }

    impl Source for CountingSource {
        fn len(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            MemorySource(&self.bytes[..]).read_exact_at(buf, offset)
        }
    }

    #[test]
    fn reads_an_archive_inside_a_window_of_a_file() {
        let zip = many_records(3);
        let mut bytes = vec![0xAB_u8; 100];
        bytes.extend_from_slice(&zip);
        bytes.extend_from_slice(&[0xCD; 50]);
        let path = std::env::temp_dir().join(format!("fs-window-{}.bin", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let open = |start, len| FileWindow::new(File::open(&path).unwrap(), start, len);
        let a = Archive::open(Box::new(open(100, zip.len() as u64).unwrap())).unwrap();
        let whole = Archive::open(Box::new(MemorySource(zip.clone()))).unwrap();
        assert_eq!(a.records().len(), whole.records().len());
        for (x, y) in a.records().iter().zip(whole.records()) {
            assert_eq!(a.offset_of(x).unwrap(), whole.offset_of(y).unwrap());
        }
        // A window past the end of the file, and reads past the window's end, fail.
        assert!(open(100, bytes.len() as u64).is_err());
        let w = open(100, 10).unwrap();
        assert!(w.read_exact_at(&mut [0; 4], 8).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    /// A file-like (not memory) archive of `n` small records, as bytes.
    fn many_records(n: usize) -> Vec<u8> {
        let mut w = ArchiveWriter::new(Vec::new(), "archive");
        for i in 0..n {
            w.write_record(&format!("data/{i}"), &[(i % 251) as u8; 100])
                .unwrap();
        }
        w.finish().unwrap()
    }

    /// A `CountingSource` over `bytes`; clone its `read` / `calls` before opening.
    fn counting(bytes: Vec<u8>) -> Box<CountingSource> {
        Box::new(CountingSource {
            bytes,
            read: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(AtomicU64::new(0)),
        })
    }

    #[test]
    fn many_headers_resolve_on_threads_like_on_one() {
        let n = PARALLEL_OPEN_MIN + 1000;
        let bytes = many_records(n);
        // A memory source resolves on one thread; a file source on several.
        let one = Archive::open(Box::new(MemorySource(bytes.clone()))).unwrap();
        let several = Archive::open(counting(bytes)).unwrap();
        assert_eq!(several.records().len(), n);
        for (a, b) in one.records().iter().zip(several.records()) {
            assert_eq!((&a.name, a.data_offset), (&b.name, b.data_offset));
        }
        let rec = several.get(&format!("data/{}", n - 1)).unwrap();
        assert_eq!(
            several.read(rec, true).unwrap(),
            vec![((n - 1) % 251) as u8; 100]
        );
    }

    #[test]
    fn many_headers_report_the_first_bad_one_in_file_order() {
        let n = PARALLEL_OPEN_MIN + 1000;
        let mut bytes = many_records(n);
        let one = Archive::open(Box::new(MemorySource(bytes.clone()))).unwrap();
        // Break the local headers of a record in the second half of the file (another
        // thread's run) and of one in the first half.
        for i in [3 * n / 4, n / 4 + 7] {
            let h = one.get(&format!("data/{i}")).unwrap().header_offset as usize;
            bytes[h] ^= 0xff;
        }
        let Err(err) = Archive::open(counting(bytes)) else {
            panic!("bad headers must fail");
        };
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("archive/data/{}'", n / 4 + 7)),
            "{msg}"
        );
        assert!(msg.contains("no local header"), "{msg}");
    }

    #[test]
    fn deferred_headers_resolve_on_first_use_like_at_open() {
        let n = 300;
        let bytes = many_records(n);
        let eager = Archive::open(Box::new(MemorySource(bytes.clone()))).unwrap();
        let source = counting(bytes);
        let calls = source.calls.clone();
        let lazy = Archive::open_deferring_data(source).unwrap();
        let opened_with = calls.load(Ordering::Relaxed);
        // data/ records wait; data.pkl-like records outside data/ do not exist here.
        assert!(lazy.records().iter().all(|r| r.data_offset == UNRESOLVED));
        let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; 100]; n];
        let jobs = lazy
            .records()
            .iter()
            .zip(bufs.iter_mut())
            .map(|(record, dst)| ReadJob {
                record,
                dst,
                swap: 0,
            })
            .collect();
        lazy.read_many_into(jobs, 2, true).unwrap();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b, &vec![(i % 251) as u8; 100]);
        }
        // Every header was read in a few windows, not one read per record.
        assert!(calls.load(Ordering::Relaxed) - opened_with < 20);
        for (a, b) in eager.records().iter().zip(lazy.records()) {
            assert_eq!(lazy.offset_of(b).unwrap(), a.data_offset);
        }
    }

    #[test]
    fn deferred_header_errors_name_their_record_at_first_use() {
        let n = 300;
        let mut bytes = many_records(n);
        let eager = Archive::open(Box::new(MemorySource(bytes.clone()))).unwrap();
        let h = eager.get("data/123").unwrap().header_offset as usize;
        bytes[h] ^= 0xff;
        let lazy = Archive::open_deferring_data(counting(bytes)).unwrap();
        let rec = lazy.get("data/5").unwrap();
        let msg = lazy.read(rec, false).unwrap_err().to_string();
        assert!(msg.contains("'archive/data/123'"), "{msg}");
        assert!(msg.contains("no local header"), "{msg}");
    }

    #[test]
    fn deferred_records_declaring_more_than_the_file_are_refused_at_open() {
        let mut w = ArchiveWriter::new(Vec::new(), "archive");
        w.write_record("data.pkl", b"x").unwrap();
        w.write_record("data/0", &[1u8; 64]).unwrap();
        let mut bytes = w.finish().unwrap();
        // Rewrite data/0's sizes in the central directory to 1 GiB.
        let eager = Archive::open(Box::new(MemorySource(bytes.clone()))).unwrap();
        let name = b"archive/data/0";
        let cd = bytes
            .windows(4 + 42 + name.len())
            .position(|w| w[..4] == 0x0201_4b50u32.to_le_bytes() && &w[46..] == name)
            .expect("central directory entry of data/0");
        bytes[cd + 20..cd + 24].copy_from_slice(&(1u32 << 30).to_le_bytes());
        bytes[cd + 24..cd + 28].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert_eq!(eager.records().len(), 2);
        let Err(err) = Archive::open_deferring_data(counting(bytes)) else {
            panic!("a record larger than the file must be refused at open");
        };
        let msg = err.to_string();
        assert!(
            msg.contains("archive/data/0") && msg.contains("runs past"),
            "{msg}"
        );
    }

    #[test]
    fn numbered_storage_keys_find_the_same_records_as_names() {
        let mut w = ArchiveWriter::new(Vec::new(), "archive");
        for name in [
            "data.pkl",
            "data/0",
            "data/7",
            "data/007",
            "data/x",
            "data/99999999",
        ] {
            w.write_record(name, name.as_bytes()).unwrap();
        }
        let a = Archive::open(Box::new(MemorySource(w.finish().unwrap()))).unwrap();
        let by_name = |k: &str| a.index_of(&format!("data/{k}"));
        for key in ["0", "7"] {
            assert_eq!(a.storage_by_number(key), Some(by_name(key)));
            assert!(by_name(key).is_some());
        }
        // Numbered but absent, below the table's bound: known absent.
        assert_eq!(a.storage_by_number("3"), Some(None));
        // Not canonical decimal, not a number, or beyond the table: the name decides.
        for key in ["007", "x", "+7", "", "99999999"] {
            assert_eq!(a.storage_by_number(key), None, "{key}");
        }
        assert!(by_name("007").is_some() && by_name("007") != by_name("7"));
    }

    #[test]
    fn opening_reads_headers_not_tensor_data() {
        let mut w = ArchiveWriter::new(Vec::new(), "archive");
        let big = vec![7u8; 4 << 20];
        for i in 0..16 {
            w.write_record(&format!("data/{i}"), &big).unwrap();
        }
        let bytes = w.finish().unwrap();
        let source = counting(bytes);
        let read = source.read.clone();
        let archive = Archive::open(source).unwrap();
        assert_eq!(archive.names().len(), 16);
        // The end records, the central directory and 16 local headers: a few KiB, not the
        // 64 MiB of record data (or a 1 MiB window per record).
        let total = read.load(Ordering::Relaxed);
        assert!(total < 128 << 10, "opening read {total} bytes");
    }

    #[test]
    fn small_neighbouring_records_are_read_in_groups() {
        let mut w = ArchiveWriter::new(Vec::new(), "archive");
        let n = 5000;
        for i in 0..n {
            w.write_record(&format!("data/{i}"), &[i as u8; 1024])
                .unwrap();
        }
        let bytes = w.finish().unwrap();
        let source = counting(bytes);
        let calls = source.calls.clone();
        let archive = Archive::open(source).unwrap();
        let mut bufs = vec![vec![0u8; 1024]; n];
        let jobs: Vec<ReadJob<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, dst)| ReadJob {
                record: archive.get(&format!("data/{i}")).unwrap(),
                dst,
                swap: 0,
            })
            .collect();
        calls.store(0, Ordering::Relaxed);
        archive.read_many_into(jobs, 2, true).unwrap();
        // ~5.5 MiB of records in 1 MiB spans: a few reads, not one per record.
        let reads = calls.load(Ordering::Relaxed);
        assert!(reads <= 8, "{reads} reads for {n} records");
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8), "record {i}");
        }
    }
}
