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
        let _disk = r.u16()?;
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
            local_header_offset,
        })
    }
}

/// The end-of-central-directory record (the classic, 32-bit one).
#[derive(Debug, Clone)]
pub struct EndOfCentralDirectory {
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
        let _disk = r.u16()?;
        let _cd_disk = r.u16()?;
        let _entries_here = r.u16()?;
        let entries = r.u16()?;
        let cd_size = r.u32()?;
        let cd_offset = r.u32()?;
        let comment_len = r.u16()?;
        Some(EndOfCentralDirectory {
            entries,
            cd_size,
            cd_offset,
            comment_len,
        })
    }
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
