//! Byte layouts of the zip structures a PyTorch checkpoint uses (APPNOTE.TXT 6.3),
//! each with its magic number, and the conventions torch's writer (miniz) follows.

pub const LOCAL_FILE_HEADER_SIGNATURE: u32 = 0x0403_4b50;
pub const CENTRAL_DIRECTORY_HEADER_SIGNATURE: u32 = 0x0201_4b50;
pub const END_OF_CENTRAL_DIRECTORY_SIGNATURE: u32 = 0x0605_4b50;
pub const ZIP64_END_OF_CENTRAL_DIRECTORY_SIGNATURE: u32 = 0x0606_4b50;
pub const ZIP64_END_OF_CENTRAL_DIRECTORY_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
pub const DATA_DESCRIPTOR_SIGNATURE: u32 = 0x0807_4b50;

pub const LOCAL_FILE_HEADER_SIZE: usize = 30;
pub const CENTRAL_DIRECTORY_HEADER_SIZE: usize = 46;
pub const END_OF_CENTRAL_DIRECTORY_SIZE: usize = 22;
pub const ZIP64_END_OF_CENTRAL_DIRECTORY_SIZE: usize = 56;
pub const ZIP64_END_OF_CENTRAL_DIRECTORY_LOCATOR_SIZE: usize = 20;
pub const DATA_DESCRIPTOR_SIZE32: usize = 16;
pub const DATA_DESCRIPTOR_SIZE64: usize = 24;

/// Extra-field id of the zip64 extended information block.
pub const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Extra-field id torch uses for alignment padding: the bytes "FB", payload of 'Z's.
pub const PADDING_EXTRA_ID: u16 = 0x4246;
/// torch aligns every record's data to this many bytes (`.storage_alignment`).
pub const STORAGE_ALIGNMENT: u64 = 64;

/// General-purpose flag bit 3: sizes and CRC follow the data in a data descriptor.
pub const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;
/// General-purpose flag bit 11: names are UTF-8.
pub const FLAG_UTF8: u16 = 1 << 11;
/// Flag bit 0: the entry is encrypted (never readable here).
pub const FLAG_ENCRYPTED: u16 = 1;

pub const METHOD_STORED: u16 = 0;
pub const METHOD_DEFLATED: u16 = 8;

/// What torch writes as "version made by" / "version needed" in the zip64 end record.
pub const ZIP64_VERSION_MADE_BY: u16 = 0x031e;
pub const ZIP64_VERSION_NEEDED: u16 = 0x002d;

pub const U16_SENTINEL: u16 = 0xFFFF;
pub const U32_SENTINEL: u32 = 0xFFFF_FFFF;

/// Little-endian field reader over a byte slice whose length the caller has checked.
pub(crate) struct Le<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Le<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Le { bytes, pos: 0 }
    }
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    pub fn u16(&mut self) -> Option<u16> {
        let b = self.bytes.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        let b = self.bytes.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        let b = self.bytes.get(self.pos..self.pos + 8)?;
        self.pos += 8;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(b)
    }
}

/// The fixed part of a central-directory file header.
#[derive(Debug, Clone)]
pub struct CentralHeader {
    pub flags: u16,
    pub method: u16,
    pub crc32: u32,
    pub compressed_size: u32,
    pub uncompressed_size: u32,
    pub name_len: u16,
    pub extra_len: u16,
    pub comment_len: u16,
    /// The disk the record starts on (0 in a single-file archive).
    pub disk_start: u16,
    pub local_header_offset: u32,
}

impl CentralHeader {
    /// Parses the 46 fixed bytes; `None` when the signature is wrong or bytes are short.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Le::new(bytes);
        if r.u32()? != CENTRAL_DIRECTORY_HEADER_SIGNATURE {
            return None;
        }
        let _made_by = r.u16()?;
        let _needed = r.u16()?;
        let flags = r.u16()?;
        let method = r.u16()?;
        let _time = r.u16()?;
        let _date = r.u16()?;
        let crc32 = r.u32()?;
        let compressed_size = r.u32()?;
        let uncompressed_size = r.u32()?;
        let name_len = r.u16()?;
        let extra_len = r.u16()?;
        let comment_len = r.u16()?;
        let disk_start = r.u16()?;
        let _internal = r.u16()?;
        let _external = r.u32()?;
        let local_header_offset = r.u32()?;
        Some(CentralHeader {
            flags,
            method,
            crc32,
            compressed_size,
            uncompressed_size,
            name_len,
            extra_len,
            comment_len,
            disk_start,
            local_header_offset,
        })
    }
}

/// The end-of-central-directory record (the classic, 32-bit one).
#[derive(Debug, Clone)]
pub struct EndOfCentralDirectory {
    /// This disk's number, and the number of the disk the central directory starts on.
    pub disk: u16,
    pub cd_disk: u16,
    /// Records on this disk, and in all.
    pub entries_here: u16,
    pub entries: u16,
    pub cd_size: u32,
    pub cd_offset: u32,
    pub comment_len: u16,
}

impl EndOfCentralDirectory {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Le::new(bytes);
        if r.u32()? != END_OF_CENTRAL_DIRECTORY_SIGNATURE {
            return None;
        }
        let disk = r.u16()?;
        let cd_disk = r.u16()?;
        let entries_here = r.u16()?;
        let entries = r.u16()?;
        let cd_size = r.u32()?;
        let cd_offset = r.u32()?;
        let comment_len = r.u16()?;
        Some(EndOfCentralDirectory {
            disk,
            cd_disk,
            entries_here,
            entries,
            cd_size,
            cd_offset,
            comment_len,
        })
    }
}

/// The zip64 end-of-central-directory record (its fixed 56 bytes; APPNOTE 4.3.14).
#[derive(Debug, Clone)]
pub struct Zip64EndOfCentralDirectory {
    /// The size of the rest of the record (44 without an extensible data sector).
    pub record_size: u64,
    pub disk: u32,
    pub cd_disk: u32,
    pub entries_here: u64,
    pub entries: u64,
    pub cd_size: u64,
    pub cd_offset: u64,
}

impl Zip64EndOfCentralDirectory {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Le::new(bytes);
        if r.u32()? != ZIP64_END_OF_CENTRAL_DIRECTORY_SIGNATURE {
            return None;
        }
        let record_size = r.u64()?;
        let _made_by = r.u16()?;
        let _needed = r.u16()?;
        Some(Zip64EndOfCentralDirectory {
            record_size,
            disk: r.u32()?,
            cd_disk: r.u32()?,
            entries_here: r.u64()?,
            entries: r.u64()?,
            cd_size: r.u64()?,
            cd_offset: r.u64()?,
        })
    }
}

/// The zip64 end-of-central-directory locator (APPNOTE 4.3.15), right before the
/// classic end record.
#[derive(Debug, Clone)]
pub struct Zip64Locator {
    /// Offset of the zip64 end record.
    pub offset: u64,
    pub total_disks: u32,
}

impl Zip64Locator {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Le::new(bytes);
        if r.u32()? != ZIP64_END_OF_CENTRAL_DIRECTORY_LOCATOR_SIGNATURE {
            return None;
        }
        let _disk = r.u32()?;
        Some(Zip64Locator {
            offset: r.u64()?,
            total_disks: r.u32()?,
        })
    }
}

/// How torch's zip reader (miniz 3.0.2's `mz_zip_reader_locate_header_sig`) finds the
/// end record: it reads the file backwards in chunks of this many bytes, each chunk
/// starting 3 bytes less than this before the previous one, and takes the *last*
/// end-record signature followed by at least 22 bytes, whatever its comment length.
pub const MINIZ_SCAN_CHUNK: u64 = 4096;
/// miniz gives up after the chunk that starts this far (or farther) from the end.
pub const MINIZ_SCAN_LIMIT: u64 = u16::MAX as u64 + END_OF_CENTRAL_DIRECTORY_SIZE as u64;

/// The lowest offset torch's reader examines for the end record in a file of `len`
/// bytes: the start of its last chunk. It stops after the chunk that starts
/// `MINIZ_SCAN_LIMIT` or more bytes from the end, after the chunk at offset 0, and
/// also when the next chunk would start before offset 0 (miniz's unsigned offset
/// arithmetic wraps around there and the read fails), so in files of 4 to 70 KiB
/// it searches less far than the 64 KiB a comment can span.
pub fn miniz_scan_floor(len: u64) -> u64 {
    let step = MINIZ_SCAN_CHUNK - 3;
    let mut cur = len.saturating_sub(MINIZ_SCAN_CHUNK);
    while cur != 0 && len - cur < MINIZ_SCAN_LIMIT && cur >= step {
        cur -= step;
    }
    cur
}

/// Appends a little-endian u16/u32/u64 to a byte vector.
pub(crate) trait PutLe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutLe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}
