//! FNV-1a, 64-bit: the one stable hash of the crate.
//!
//! Used where a hash must be the same in every build, platform and process
//! (`std::hash` promises none of that): a room's place on the ring
//! ([`crate::ring::room_hash`]), the membership digest nodes compare
//! ([`crate::cluster::view`]) and the API's idempotency keys. Changing a
//! value moves rooms between workers and splits a cluster across versions;
//! the callers' tests pin them.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// An FNV-1a hash being computed.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a::new()
    }
}

impl Fnv1a {
    pub const fn new() -> Fnv1a {
        Fnv1a(OFFSET)
    }

    /// Hash `bytes` as they are.
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) -> &mut Fnv1a {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    /// Hash `bytes` as one field of several: ended by a 0xff byte (which
    /// UTF-8 text never contains), so `["ab", "c"]` and `["a", "bc"]` differ.
    #[inline]
    pub fn field(&mut self, bytes: &[u8]) -> &mut Fnv1a {
        self.write(bytes).write(&[0xff])
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Fnv1a;

    #[test]
    fn the_published_test_vectors() {
        assert_eq!(Fnv1a::new().finish(), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv1a::new().write(b"a").finish(), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            Fnv1a::new().write(b"foobar").finish(),
            0x8594_4171_f739_67e8
        );
    }
}
