//! Sizes and durations as people write them, wherever they write them: flags,
//! environment variables and the configuration file all go through this one parser, so
//! `--default-segment-bytes 1GiB`, `STRATA_DEFAULT_SEGMENT_BYTES=1GiB` and
//! `default_segment_bytes = "1GiB"` mean the same, and `--help` can show defaults in a
//! form the flag accepts.
//!
//! - [`ByteSize`]: a whole number with `B`, `KiB`, `MiB`, `GiB` or `TiB` (powers of
//!   1024), or a plain number of bytes.
//! - [`Millis`]: a whole number with `ms`, `s`, `m`, `h` or `d`, or a plain number of
//!   milliseconds (settings that take one are named `*_ms`).
//! - [`Limit`]: either of those, or `-1` for "no limit".
//!
//! Every value fits an `i64`, so it converts to the protocol's signed fields exactly.
//! Clap takes these types through their [`FromStr`]; serde accepts a string or an
//! integer (the plain number, in the base unit).

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A value a person wrote that is not a size or duration this module understands. The
/// message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// Suffixes of sizes, largest first, with their factors.
const SIZE_UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];
/// Suffixes of durations, largest first, with their factors in milliseconds.
const DURATION_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];
const SIZE_EXPECTED: &str =
    "expected a size such as 1GiB, 64MiB, 512KiB or a number of bytes (units are powers of 1024: B, KiB, MiB, GiB, TiB)";
const DURATION_EXPECTED: &str =
    "expected a duration such as 7d, 12h, 30m, 45s, 500ms or a number of milliseconds";

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// A duration in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

/// A limit that `-1` switches off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit<T> {
    /// `-1`: no limit.
    Unlimited,
    /// This much.
    At(T),
}

/// Splits `text` into its number and its unit, and scales the number by the unit's
/// factor from `units`; a bare number is in the base unit (factor 1).
fn parse(text: &str, units: &[(&str, u64)], expected: &str) -> Result<u64, UnitError> {
    let invalid = || UnitError(format!("invalid value {text:?}: {expected}"));
    let trimmed = text.trim();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(invalid());
    }
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let unit = unit.trim_start();
    let factor = if unit.is_empty() {
        1
    } else {
        units
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, factor)| factor)
            .ok_or_else(invalid)?
    };
    number
        .checked_mul(factor)
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or_else(|| UnitError(format!("{text:?} is too large")))
}

/// Writes `value` with the largest unit of `units` that divides it exactly; a value no
/// unit divides (or 0) is written with the base unit, the last of `units`.
fn write(f: &mut fmt::Formatter<'_>, value: u64, units: &[(&str, u64)]) -> fmt::Result {
    let (name, factor) = units
        .iter()
        .find(|(_, factor)| value != 0 && value.is_multiple_of(*factor))
        .copied()
        .unwrap_or(units[units.len() - 1]);
    write!(f, "{}{name}", value / factor)
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse(s, &SIZE_UNITS, SIZE_EXPECTED).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    /// `1GiB`, `1536KiB`, `1000B`: the form [`ByteSize::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write(f, self.0, &SIZE_UNITS)
    }
}

impl FromStr for Millis {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse(s, &DURATION_UNITS, DURATION_EXPECTED).map(Millis)
    }
}

impl fmt::Display for Millis {
    /// `7d`, `90m`, `1500ms`: the form [`Millis::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write(f, self.0, &DURATION_UNITS)
    }
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> u64 {
        size.0
    }
}

impl From<Millis> for u64 {
    fn from(duration: Millis) -> u64 {
        duration.0
    }
}

impl<T: Into<u64>> Limit<T> {
    /// The limit as the protocol and the topic settings write it: -1 for none.
    pub fn to_protocol(self) -> i64 {
        match self {
            Limit::Unlimited => -1,
            // Parsing keeps every value within i64.
            Limit::At(value) => value.into().min(i64::MAX as u64) as i64,
        }
    }
}

impl<T: FromStr<Err = UnitError>> FromStr for Limit<T> {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        if s.trim() == "-1" {
            return Ok(Limit::Unlimited);
        }
        s.parse()
            .map(Limit::At)
            .map_err(|UnitError(e)| UnitError(format!("{e}, or -1 for no limit")))
    }
}

impl<T: fmt::Display> fmt::Display for Limit<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Unlimited => f.write_str("-1"),
            Limit::At(value) => value.fmt(f),
        }
    }
}

/// Reads a string through `FromStr`, and an integer as its decimal text: a plain number
/// is then in the base unit, and a negative one gets the answer it gets on the command
/// line (-1 is a [`Limit`]'s "none", anything else an error).
struct TextOrInteger<T>(PhantomData<T>);

impl<T: FromStr<Err = UnitError>> Visitor<'_> for TextOrInteger<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string with a unit, such as \"64MiB\" or \"7d\", or an integer")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInteger(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInteger(PhantomData))
    }
}

impl<'de, T: FromStr<Err = UnitError>> Deserialize<'de> for Limit<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrInteger(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(text: &str) -> Result<u64, UnitError> {
        text.parse::<ByteSize>().map(|s| s.0)
    }

    fn millis(text: &str) -> Result<u64, UnitError> {
        text.parse::<Millis>().map(|d| d.0)
    }

    #[test]
    fn sizes_take_binary_units_or_plain_bytes() {
        for (text, bytes) in [
            ("1GiB", 1 << 30),
            ("64MiB", 64 << 20),
            ("512KiB", 512 << 10),
            ("100B", 100),
            ("1048576", 1 << 20),
            ("0", 0),
            ("2TiB", 2 << 40),
            (" 1 GiB ", 1 << 30),
        ] {
            assert_eq!(size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "", "GiB", "1GB", "1gib", "1.5GiB", "-5", "1 GiB x", "0x10", "1KB", "1e6",
        ] {
            let e = size(bad).expect_err(bad);
            assert!(e.to_string().contains("KiB, MiB, GiB"), "{bad}: {e}");
        }
        assert!(size("8388608TiB").is_err(), "past i64");
        assert!(size("99999999999999999999").is_err());
    }

    #[test]
    fn durations_take_units_or_plain_milliseconds() {
        for (text, ms) in [
            ("7d", 604_800_000),
            ("1h", 3_600_000),
            ("30m", 1_800_000),
            ("30s", 30_000),
            ("500ms", 500),
            ("30000", 30_000),
            ("2 h", 7_200_000),
        ] {
            assert_eq!(millis(text), Ok(ms), "{text}");
        }
        for bad in ["", "7 days", "1.5h", "1H", "1w", "-1", "ms"] {
            let e = millis(bad).expect_err(bad);
            assert!(e.to_string().contains("7d, 12h"), "{bad}: {e}");
        }
    }

    #[test]
    fn display_writes_what_parsing_reads() {
        for bytes in [
            0,
            1,
            1000,
            1024,
            1536,
            1 << 20,
            3 << 30,
            1 << 40,
            123_456_789,
        ] {
            let shown = ByteSize(bytes).to_string();
            assert_eq!(size(&shown), Ok(bytes), "{shown}");
        }
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        for ms in [0, 1, 999, 1000, 90_000, 3_600_000, 604_800_000, 1_500] {
            let shown = Millis(ms).to_string();
            assert_eq!(millis(&shown), Ok(ms), "{shown}");
        }
        assert_eq!(Millis(604_800_000).to_string(), "7d");
        assert_eq!(Millis(90_000).to_string(), "90s");
        assert_eq!(Limit::<Millis>::Unlimited.to_string(), "-1");
    }

    #[test]
    fn limits_take_minus_one_for_none() {
        assert_eq!("-1".parse::<Limit<ByteSize>>(), Ok(Limit::Unlimited));
        assert_eq!(
            "10GiB".parse::<Limit<ByteSize>>(),
            Ok(Limit::At(ByteSize(10 << 30)))
        );
        assert_eq!(
            "3d".parse::<Limit<Millis>>().map(Limit::to_protocol),
            Ok(259_200_000)
        );
        assert_eq!(Limit::<Millis>::Unlimited.to_protocol(), -1);
        let e = "-2".parse::<Limit<Millis>>().expect_err("-2");
        assert!(e.to_string().ends_with("or -1 for no limit"), "{e}");
    }

    #[derive(Debug, serde::Deserialize)]
    struct File {
        size: Option<ByteSize>,
        every: Option<Millis>,
        keep: Option<Limit<Millis>>,
    }

    fn file(text: &str) -> Result<File, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn configuration_files_take_strings_or_plain_numbers() {
        let f = file("size = \"64MiB\"\nevery = 30000\nkeep = -1\n").expect("valid");
        assert_eq!(f.size, Some(ByteSize(64 << 20)));
        assert_eq!(f.every, Some(Millis(30_000)));
        assert_eq!(f.keep, Some(Limit::Unlimited));
        let f = file("size = 1024\nkeep = \"7d\"\n").expect("valid");
        assert_eq!((f.size, f.every), (Some(ByteSize(1024)), None));
        assert_eq!(f.keep, Some(Limit::At(Millis(604_800_000))));
        for bad in [
            "size = \"1GB\"",
            "size = -1",
            "every = -5",
            "keep = -2",
            "size = 1.5",
        ] {
            assert!(file(bad).is_err(), "{bad}");
        }
        let e = file("size = -1").expect_err("negative size");
        assert!(e.contains("KiB, MiB"), "{e}");
    }
}
