//! Byte-swapping kernels for checkpoints whose byte order differs from this machine's.

/// Reverses the bytes of every `elem_size`-byte element of `buf` in place.
/// Complex numbers are swapped per component: pass the component size.
pub fn byteswap_in_place(buf: &mut [u8], elem_size: usize) -> Result<(), String> {
    if elem_size <= 1 {
        return Ok(());
    }
    if buf.len() % elem_size != 0 {
        return Err(format!(
            "{} bytes is not a whole number of {elem_size}-byte elements",
            buf.len()
        ));
    }
    // Fixed-size arms let the compiler vectorise each loop.
    match elem_size {
        2 => buf.chunks_exact_mut(2).for_each(|c| c.swap(0, 1)),
        4 => buf.chunks_exact_mut(4).for_each(|c| {
            let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]).swap_bytes();
            c.copy_from_slice(&v.to_ne_bytes());
        }),
        8 => buf.chunks_exact_mut(8).for_each(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            c.copy_from_slice(&u64::from_ne_bytes(a).swap_bytes().to_ne_bytes());
        }),
        n => buf.chunks_exact_mut(n).for_each(|c| c.reverse()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_each_width() {
        let mut b = vec![1u8, 2, 3, 4, 5, 6, 7, 8];
        byteswap_in_place(&mut b, 2).unwrap();
        assert_eq!(b, [2, 1, 4, 3, 6, 5, 8, 7]);
        let mut b = vec![1u8, 2, 3, 4, 5, 6, 7, 8];
        byteswap_in_place(&mut b, 4).unwrap();
        assert_eq!(b, [4, 3, 2, 1, 8, 7, 6, 5]);
        let mut b = vec![1u8, 2, 3, 4, 5, 6, 7, 8];
        byteswap_in_place(&mut b, 8).unwrap();
        assert_eq!(b, [8, 7, 6, 5, 4, 3, 2, 1]);
        let mut b = vec![1u8, 2, 3];
        byteswap_in_place(&mut b, 1).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }

    #[test]
    fn refuses_partial_elements() {
        let mut b = vec![0u8; 6];
        assert!(byteswap_in_place(&mut b, 4).is_err());
    }

    #[test]
    fn swap_is_an_involution() {
        let orig: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        for w in [2, 4, 8, 16] {
            let mut b = orig.clone();
            byteswap_in_place(&mut b, w).unwrap();
            assert_ne!(b, orig);
            byteswap_in_place(&mut b, w).unwrap();
            assert_eq!(b, orig);
        }
    }
}
