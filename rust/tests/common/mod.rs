//! Helpers shared by the integration tests: little-endian fields and the end of a
//! hand-built zip.

pub fn u16le(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}

pub fn u32le(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Appends the central directory `cd` of `entries` records, then a plain (not
/// zip64) end-of-central-directory record pointing at it.
pub fn finish_zip(out: &mut Vec<u8>, cd: &[u8], entries: usize) {
    let (cd_offset, cd_size) = (out.len() as u32, cd.len() as u32);
    out.extend_from_slice(cd);
    u32le(out, 0x0605_4b50);
    u16le(out, 0);
    u16le(out, 0);
    u16le(out, entries as u16);
    u16le(out, entries as u16);
    u32le(out, cd_size);
    u32le(out, cd_offset);
    u16le(out, 0);
}
