//! Deterministic pseudo-randomness (splitmix64) and the reversible contact id codec.
//!
//! Everything the simulator invents is a pure function of the seed and a few integers, so two
//! processes with the same config serve byte-identical data, and nothing needs to be stored.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const C1: u64 = 0xBF58_476D_1CE4_E5B9;
const C2: u64 = 0x94D0_49BB_1331_11EB;

/// The splitmix64 finaliser. It is a bijection on `u64`, which [`unmix`] inverts.
pub(crate) const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(C1);
    z = (z ^ (z >> 27)).wrapping_mul(C2);
    z ^ (z >> 31)
}

/// Multiplicative inverse of an odd number modulo 2^64 (Newton iteration).
const fn inverse(a: u64) -> u64 {
    let mut x = a;
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// Inverts `y = x ^ (x >> s)`.
const fn unxorshift(y: u64, s: u32) -> u64 {
    let mut x = y;
    let mut i = 0;
    while i * s < 64 {
        x = y ^ (x >> s);
        i += 1;
    }
    x
}

const fn unmix(mut z: u64) -> u64 {
    z = unxorshift(z, 31).wrapping_mul(inverse(C2));
    z = unxorshift(z, 27).wrapping_mul(inverse(C1));
    unxorshift(z, 30)
}

/// Hashes a sequence of integers into one well-mixed value.
pub(crate) fn hash(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(GOLDEN, |h, &p| mix(h.wrapping_add(GOLDEN) ^ p))
}

/// A small splitmix64 stream; cheap to create per contact.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n` > 0; 0 gives 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1).max(1) as u64) as i64
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Base 62 in ASCII order, so fixed-width encodings sort like the numbers they encode.
const B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const B62_9: u64 = 13_537_086_546_263_552; // 62^9

fn push_b62(out: &mut String, mut v: u64, width: usize) {
    let mut buf = [0u8; 11];
    for slot in buf[..width].iter_mut().rev() {
        *slot = B62[(v % 62) as usize];
        v /= 62;
    }
    out.extend(buf[..width].iter().map(|&b| b as char));
}

fn b62_digit(c: u8) -> Option<u64> {
    Some(u64::from(match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'Z' => c - b'A' + 10,
        b'a'..=b'z' => c - b'a' + 36,
        _ => return None,
    }))
}

/// A 20-character `[0-9A-Za-z]` id made of 20 pseudo-random characters; used for children,
/// custom fields and other ids that are never decoded.
pub(crate) fn opaque_id(h: u64) -> String {
    let mut s = String::with_capacity(20);
    push_b62(&mut s, h % B62_9, 9);
    push_b62(&mut s, mix(h), 11);
    s
}

/// Contact ids: 20 characters that look random but decode back to (location index, slot),
/// so the simulator needs no id-to-contact map even for millions of contacts.
///
/// The first 11 characters are `mix((loc << 32 | slot) ^ key)` in fixed-width base 62 (so id
/// order equals the order of that number); the last 9 are a check derived from it, so a
/// made-up id almost never decodes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IdCodec {
    key: u64,
    check: u64,
}

impl IdCodec {
    pub(crate) fn new(seed: u64) -> IdCodec {
        IdCodec {
            key: hash(&[seed, 1]),
            check: hash(&[seed, 2]),
        }
    }

    /// The number whose order is the order of the id strings.
    pub(crate) fn sort_key(&self, loc: u32, slot: u32) -> u64 {
        mix((u64::from(loc) << 32 | u64::from(slot)) ^ self.key)
    }

    pub(crate) fn encode(&self, loc: u32, slot: u32) -> String {
        let y = self.sort_key(loc, slot);
        let mut s = String::with_capacity(20);
        push_b62(&mut s, y, 11);
        push_b62(&mut s, mix(y ^ self.check) % B62_9, 9);
        s
    }

    pub(crate) fn decode(&self, id: &str) -> Option<(u32, u32)> {
        let b = id.as_bytes();
        if b.len() != 20 {
            return None;
        }
        let mut y: u128 = 0;
        for &c in &b[..11] {
            y = y * 62 + u128::from(b62_digit(c)?);
        }
        let y = u64::try_from(y).ok()?;
        let mut check = 0u64;
        for &c in &b[11..] {
            check = check * 62 + b62_digit(c)?;
        }
        if check != mix(y ^ self.check) % B62_9 {
            return None;
        }
        let x = unmix(y) ^ self.key;
        Some(((x >> 32) as u32, x as u32))
    }
}

/// Lower-case hex of `n` pseudo-random bytes (trace ids, business ids).
pub(crate) fn hex_id(h: u64, chars: usize) -> String {
    let mut s = String::with_capacity(chars);
    let mut v = h;
    let mut i = 0u64;
    while s.len() < chars {
        if i.is_multiple_of(16) {
            v = mix(h.wrapping_add(i));
        }
        s.push(char::from(b"0123456789abcdef"[(v & 15) as usize]));
        v >>= 4;
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmix_inverts_mix() {
        for x in [0u64, 1, 42, u64::MAX, 0xDEAD_BEEF_0000_0001] {
            assert_eq!(unmix(mix(x)), x);
        }
    }

    #[test]
    fn contact_ids_round_trip_and_sort_like_their_key() {
        let codec = IdCodec::new(42);
        let mut prev: Option<(u64, String)> = None;
        for slot in [0u32, 1, 2, 999_999, u32::MAX] {
            let id = codec.encode(3, slot);
            assert_eq!(id.len(), 20);
            assert!(id.bytes().all(|c| c.is_ascii_alphanumeric()));
            assert_eq!(codec.decode(&id), Some((3, slot)));
            let key = codec.sort_key(3, slot);
            if let Some((pk, pid)) = &prev {
                assert_eq!(pk.cmp(&key), pid.as_str().cmp(id.as_str()));
            }
            prev = Some((key, id));
        }
        assert_eq!(codec.decode("aaaaaaaaaaaaaaaaaaaa"), None);
        assert_eq!(codec.decode("short"), None);
        assert_eq!(IdCodec::new(7).decode(&codec.encode(0, 5)), None);
    }
}
