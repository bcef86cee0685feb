//! The 128-byte-swizzled shared-memory tile layout of the wgmma kernels and the wgmma matrix
//! descriptors that address it. Pure arithmetic, so it also builds for the host, where its tests
//! run.

/// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `rows` rows: 64-element
/// (128-byte) column blocks one after another, each `rows x 128 B`, and inside a block chunk `c` of
/// row `r` at chunk `c ^ (r % 8)`: the hardware's 128B swizzle (TMA's `CU_TENSOR_MAP_SWIZZLE_128B`),
/// which needs 1024-byte-aligned blocks.
#[inline(always)]
pub fn swizzled(rows: usize, row: usize, chunk: usize) -> u32 {
    ((chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16)) as u32
}

/// wgmma shared-memory descriptor, 128-byte swizzle. Offsets in bytes.
#[inline(always)]
pub fn descriptor(addr: u32, leading_byte_offset: u32, stride_byte_offset: u32) -> u64 {
    ((addr as u64 >> 4) & 0x3fff)
        | (((leading_byte_offset as u64 >> 4) & 0x3fff) << 16)
        | (((stride_byte_offset as u64 >> 4) & 0x3fff) << 32)
        | (1u64 << 62)
}

/// The descriptor of the tile `offset` bytes (a multiple of 16) past the one `base` describes: one
/// 32-bit add to the address field (the low 14 bits, in 16-byte units), where `descriptor` is a
/// shift, a mask and an or per wgmma. Shared-memory addresses stay below 2^18 bytes (at most
/// 228 KiB per SM), so the sum never carries out of the field.
#[inline(always)]
pub fn descriptor_plus(base: u64, offset: u32) -> u64 {
    (base & !0xffff_ffff) | (base as u32).wrapping_add(offset >> 4) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `descriptor_plus` is `descriptor` of the moved address wherever a tile and its offset lie
    /// in 228 KiB of shared memory, for the leading and stride offsets the kernels use.
    #[test]
    fn descriptor_plus_moves_only_the_address() {
        const SMEM: u32 = 228 * 1024;
        for (lbo, sbo) in [(16, 1024), (48 * 128, 1024), (128 * 128, 1024)] {
            for base in (0..SMEM).step_by(1024) {
                for offset in (0..SMEM - base).step_by(16 * 7) {
                    assert_eq!(
                        descriptor_plus(descriptor(base, lbo, sbo), offset),
                        descriptor(base + offset, lbo, sbo),
                        "base {base} offset {offset} lbo {lbo}"
                    );
                }
            }
        }
    }

    /// Every chunk of a swizzled tile has its own 16 bytes, inside the tile.
    #[test]
    fn swizzled_is_a_permutation_of_the_tile() {
        for (rows, chunks) in [(64, 16), (128, 16), (128, 32), (48, 32)] {
            let mut seen = [false; 128 * 32];
            for row in 0..rows {
                for chunk in 0..chunks {
                    let at = swizzled(rows, row, chunk) as usize;
                    assert_eq!(at % 16, 0);
                    assert!(
                        !seen[at / 16],
                        "rows {rows}: row {row} chunk {chunk} collides"
                    );
                    seen[at / 16] = true;
                }
            }
            assert!(seen[..rows * chunks].iter().all(|&s| s));
        }
    }
}
