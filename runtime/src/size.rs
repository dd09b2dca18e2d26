//! Byte sizes as people write them in config files and flags ([`ByteSize`]): parsing, display
//! and (de)serialization.
//!
//! Invariants: parsing is exact (integer arithmetic on the digits, rounded down once, overflow
//! refused); display is for people (two decimals, binary units) and never parsed back.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A number of bytes, written in a file as an integer (bytes) or a size string.
///
/// Size strings are a non-negative decimal number (fractions allowed, no exponent), an optional
/// single space, and an optional unit: `B`; `KB` `MB` `GB` `TB` (powers of 1000); `KiB` `MiB`
/// `GiB` `TiB` (powers of 1024). The all-lowercase spellings (`b`, `kb` .. `tb`, `kib` .. `tib`)
/// are accepted too and mean the same bytes; other mixed cases (`Gb`, `gB`) and bare letters
/// (`G`) are rejected as ambiguous. Fractions of a byte after scaling are rounded down
/// (`"1.1GiB"` = 1181116006), at most 18 digits may follow the point, and the result must fit
/// in 64 bits. A TOML float (e.g. `16e9`) is accepted as a byte count and also rounded down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const SIZE_HINT: &str = "use e.g. \"12GiB\", \"1.5GB\" or a byte count";

/// Accepted units and their multipliers, in bytes.
const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Largest number of digits accepted after the decimal point.
const MAX_FRACTION_DIGITS: usize = 18;

impl ByteSize {
    /// Parses a size string (see the type's documentation). The error is one line quoting the
    /// input, without the key (callers add it).
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let not_a_size = || format!("{text:?} is not a size ({SIZE_HINT})");
        let s = text.trim();
        if s.starts_with('-') {
            return Err(format!("{text:?} is negative; a size must be 0 or more"));
        }
        let number_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, rest) = s.split_at(number_end);
        let unit = rest.strip_prefix(' ').unwrap_or(rest);
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit || name.to_ascii_lowercase() == unit)
                .map(|&(_, m)| m)
                .ok_or_else(not_a_size)?
        };
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(not_a_size());
        }
        if fraction.len() > MAX_FRACTION_DIGITS {
            return Err(format!(
                "{text:?} has more than {MAX_FRACTION_DIGITS} digits after the point"
            ));
        }
        let too_large = || format!("{text:?} is too large (at most {} bytes)", u64::MAX);
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let bytes_whole = whole
            .checked_mul(u128::from(multiplier))
            .ok_or_else(too_large)?;
        let bytes_fraction = if fraction.is_empty() {
            0
        } else {
            // Both factors are below 1e18 and 2^41, so the product fits in 128 bits.
            let numerator: u128 = fraction.parse().map_err(|_| not_a_size())?;
            let denominator = 10u128.pow(fraction.len() as u32);
            numerator * u128::from(multiplier) / denominator
        };
        let total = bytes_whole
            .checked_add(bytes_fraction)
            .ok_or_else(too_large)?;
        u64::try_from(total).map(ByteSize).map_err(|_| too_large())
    }

    /// The shortest exact spelling, e.g. `"12GiB"`, `"16GB"`, `"4097B"`; parses back to `self`.
    pub fn to_exact_string(self) -> String {
        if self.0 == 0 {
            return "0B".to_string();
        }
        // Largest unit first, so the number is as short as possible.
        const LARGEST_FIRST: [(&str, u64); 8] = [
            ("TiB", 1 << 40),
            ("TB", 1_000_000_000_000),
            ("GiB", 1 << 30),
            ("GB", 1_000_000_000),
            ("MiB", 1 << 20),
            ("MB", 1_000_000),
            ("KiB", 1 << 10),
            ("KB", 1_000),
        ];
        for (name, m) in LARGEST_FIRST {
            if self.0.is_multiple_of(m) {
                return format!("{}{name}", self.0 / m);
            }
        }
        format!("{}B", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        ByteSize::parse(s)
    }
}

impl fmt::Display for ByteSize {
    /// Human form in binary units with two decimals (`12.00 GiB`); below 1 KiB, whole bytes
    /// (`512 B`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BINARY: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, m) in BINARY {
            if self.0 >= m {
                return write!(f, "{:.2} {name}", self.0 as f64 / m as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_exact_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl serde::de::Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a size ({SIZE_HINT})")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("{v} is negative; a size must be 0 or more")))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
        if v.is_nan() || v.is_infinite() {
            Err(E::custom(format!("{v} is not a size ({SIZE_HINT})")))
        } else if v < 0.0 {
            Err(E::custom(format!(
                "{v} is negative; a size must be 0 or more"
            )))
        } else if v >= 18_446_744_073_709_551_616.0 {
            Err(E::custom(format!(
                "{v} is too large (at most {} bytes)",
                u64::MAX
            )))
        } else {
            // In range and non-negative: the cast rounds down, as documented.
            Ok(ByteSize(v as u64))
        }
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
        ByteSize::parse(v).map_err(E::custom)
    }
}
