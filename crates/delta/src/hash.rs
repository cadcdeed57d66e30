//! Whole-file BLAKE3.

/// Whole-file BLAKE3, incremental (thin wrapper so callers depend only on this crate).
#[derive(Debug, Clone, Default)]
pub struct FileHasher(blake3::Hasher);

impl FileHasher {
    /// A hasher with no input yet.
    pub fn new() -> Self {
        FileHasher(blake3::Hasher::new())
    }

    /// Feed the next bytes of the file.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The hash of everything fed so far (more data may still be fed afterwards).
    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// BLAKE3 of `data`.
pub fn hash_bytes(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_incremental() {
        let empty = [
            0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc,
            0xc9, 0x49, 0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca,
            0xe4, 0x1f, 0x32, 0x62,
        ];
        assert_eq!(hash_bytes(b""), empty);
        assert_eq!(FileHasher::new().finish(), empty);
        assert_eq!(FileHasher::default().finish(), empty);

        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 256) as u8).collect();
        let mut h = FileHasher::new();
        for chunk in data.chunks(7_777) {
            h.update(chunk);
        }
        assert_eq!(h.finish(), hash_bytes(&data));
        assert_ne!(hash_bytes(&data[1..]), hash_bytes(&data));
    }
}
