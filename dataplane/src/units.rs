//! Sizes, rates and durations the way operators write them, for the CLI and the configs.
//!
//! # Sizes ([`parse_size`])
//!
//! A number with an optional unit: `4096` (bytes), `100k`, `512M`, `4G`, `256MiB`, `1GiB`,
//! `1.5GiB`, `2 TiB`. Units are always **binary**, whichever way they are spelled, as memory
//! sizes are everywhere else (QEMU's `-m 4G`, `free -g`, the kernel's `mem=`):
//!
//! | unit | spellings (case-insensitive) | bytes |
//! |---|---|---|
//! | byte | none, `B`, `byte`, `bytes` | 1 |
//! | KiB | `K`, `KB`, `KiB` | 2^10 |
//! | MiB | `M`, `MB`, `MiB` | 2^20 |
//! | GiB | `G`, `GB`, `GiB` | 2^30 |
//! | TiB | `T`, `TB`, `TiB` | 2^40 |
//! | PiB | `P`, `PB`, `PiB` | 2^50 |
//! | EiB | `E`, `EB`, `EiB` | 2^60 |
//!
//! So `512MB` is 512 MiB here. A fraction is allowed with a unit and rounds to the nearest
//! byte (`1.5GiB` = 1610612736); a plain byte count must be whole.
//!
//! # Rates ([`parse_rate`])
//!
//! Link rates are given in bits, decimal, as network equipment counts them; transfer rates
//! in bytes. The result is always bytes per second.
//!
//! | form | meaning | example |
//! |---|---|---|
//! | a bare number | bytes per second | `1000000` |
//! | `bit`, `bits`, `bit/s`, `b/s`, `bps` after `k`, `M`, `G`, `T` | 10^3, 10^6, 10^9, 10^12 bits per second | `100Mbit`, `1Gbit/s`, `10Gbps`, `300kbit` |
//! | the same after `Ki`, `Mi`, `Gi`, `Ti` | 2^10 .. 2^40 bits per second | `100Mibit` |
//! | `B/s`, `Bps` after `k`, `M`, `G`, `T` | 10^3 .. 10^12 bytes per second | `500MB/s`, `12.5MB/s` |
//! | `iB/s` after `K`, `M`, `G`, `T` | 2^10 .. 2^40 bytes per second | `500MiB/s` |
//!
//! The case of `b`/`B` matters where it is the whole unit (`Mb/s` is bits, `MB/s` bytes);
//! prefixes and the words `bit` are case-insensitive. Note `Mbps` means megabits per second,
//! as on a datasheet, not megabytes as in `tc`. A bytes unit needs its `/s` (`500MB` alone is
//! a size, not a rate). Rates must be above zero; [`parse_rate_limit`] also accepts `none`,
//! `unlimited` and `off`.
//!
//! # Durations ([`parse_duration`])
//!
//! A number with a unit: `ns`, `us` (or `µs`), `ms`, `s`, `min` (or `m`), `h`; `300ms`, `2s`,
//! `1.5s`. A bare number is refused: seconds or milliseconds would be a guess.
//!
//! Every parser trims surrounding whitespace, allows spaces between number and unit, and
//! refuses negative, empty, non-numeric (`NaN`, `inf`, `1e9`) and overflowing input with a
//! [`UnitError`] that quotes the input and shows an accepted form.
//!
//! # Why by hand
//!
//! The kept crates were weighed for each job and read these forms differently:
//! `bytesize` parses `512MB` as 512 x 10^6 bytes (here every size unit is binary, as QEMU and
//! the kernel read it) and has no rates; `humantime` refuses fractions (`1.5s`) and formats
//! `14s 950ms` where skyferry's tables print `14.95 s`; neither parses link rates, where the
//! case of `b`/`B` decides bits or bytes (`100Mb/s` vs `100MB/s`). Their errors would also
//! lose the quoted input and accepted form every message here carries. The tests below pin
//! the forms in which they differ.

use std::fmt;
use std::time::Duration;

/// What was being parsed, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// A size in bytes.
    Size,
    /// A rate in bytes per second.
    Rate,
    /// A duration.
    Duration,
}

impl Quantity {
    /// An accepted form, for the message.
    pub fn hint(self) -> &'static str {
        match self {
            Quantity::Size => "use a number with an optional unit, like 256MiB, 1GiB or 4G",
            Quantity::Rate => {
                "use a number with a unit, like 100Mbit, 1Gbit/s, 500MB/s or 500MiB/s \
                 (a bare number is bytes per second)"
            }
            Quantity::Duration => "use a number with a unit, like 300ms, 2s or 1.5s",
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantity::Size => "size",
            Quantity::Rate => "rate",
            Quantity::Duration => "duration",
        })
    }
}

/// What is wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Nothing but whitespace.
    Empty,
    /// A minus sign.
    Negative,
    /// No number where one was expected (also `NaN`, `inf`, exponents).
    NotANumber,
    /// A unit this quantity does not know.
    UnknownUnit(String),
    /// A duration without a unit.
    MissingUnit,
    /// Beyond what fits in 64 bits.
    TooLarge,
    /// A fraction of a byte.
    FractionalBytes,
    /// A rate of zero (or one that rounds to zero bytes per second).
    Zero,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Empty => f.write_str("it is empty"),
            Problem::Negative => f.write_str("it cannot be negative"),
            Problem::NotANumber => f.write_str("not a number"),
            Problem::UnknownUnit(u) => write!(f, "unknown unit {u:?}"),
            Problem::MissingUnit => f.write_str("the unit is missing"),
            Problem::TooLarge => f.write_str("too large for 64 bits"),
            Problem::FractionalBytes => f.write_str("a byte count must be whole"),
            Problem::Zero => f.write_str("it must be above zero"),
        }
    }
}

/// A size, rate or duration that cannot be parsed. The message quotes the input and shows
/// an accepted form, e.g. `invalid size "12XB": unknown unit "XB"; use a number with an
/// optional unit, like 256MiB, 1GiB or 4G`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {quantity} {:?}: {problem}; {}", shown(.input), .quantity.hint())]
pub struct UnitError {
    /// What was being parsed.
    pub quantity: Quantity,
    /// The input as given.
    pub input: String,
    /// What is wrong with it.
    pub problem: Problem,
}

/// The input for the message, cut short if it is very long.
fn shown(input: &str) -> String {
    const MAX: usize = 40;
    if input.chars().count() <= MAX {
        input.to_string()
    } else {
        let mut s: String = input.chars().take(MAX).collect();
        s.push_str("...");
        s
    }
}

/// A non-negative decimal number: `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: u128,
    scale: u32,
}

/// Fraction digits kept; later ones are below any unit's resolution and are dropped.
const MAX_FRACTION_DIGITS: usize = 18;

impl Decimal {
    fn is_whole(self) -> bool {
        self.mantissa.is_multiple_of(10u128.pow(self.scale))
    }

    /// `self * num / den`, rounded to the nearest integer, if it fits in a u64.
    fn scale_to_u64(self, num: u128, den: u128) -> Option<u64> {
        let den = den.checked_mul(10u128.pow(self.scale))?;
        let n = self.mantissa.checked_mul(num)?.checked_add(den / 2)?;
        u64::try_from(n / den).ok()
    }
}

/// Splits `input` into its number and unit, or says what is wrong.
fn split(input: &str, quantity: Quantity) -> Result<(Decimal, &str), UnitError> {
    let err = |problem| UnitError {
        quantity,
        input: input.to_string(),
        problem,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err(Problem::Empty));
    }
    if s.starts_with('-') {
        return Err(err(Problem::Negative));
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    let well_formed = !int.is_empty() && frac.is_none_or(|f| !f.is_empty() && !f.contains('.'));
    if !well_formed {
        return Err(err(Problem::NotANumber));
    }
    let mut d = Decimal {
        mantissa: 0,
        scale: 0,
    };
    let frac = frac.unwrap_or("");
    let kept = frac.len().min(MAX_FRACTION_DIGITS);
    for c in int.bytes().chain(frac.bytes().take(kept)) {
        d.mantissa = d
            .mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(c - b'0')))
            .ok_or_else(|| err(Problem::TooLarge))?;
    }
    d.scale = u32::try_from(kept).map_err(|_| err(Problem::TooLarge))?;
    let unit = unit.trim_start();
    // "1e9", "5x": the unit is checked by the caller; a number glued to letters that no unit
    // starts with is still "unknown unit", which names the letters.
    Ok((d, unit))
}

/// Parses a size in bytes (see the [module docs](self): units are binary, `B` optional).
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let q = Quantity::Size;
    let err = |problem| UnitError {
        quantity: q,
        input: input.to_string(),
        problem,
    };
    let (d, unit) = split(input, q)?;
    let lower = unit.to_ascii_lowercase();
    let shift = match lower.as_str() {
        "" | "b" | "byte" | "bytes" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(err(Problem::UnknownUnit(unit.to_string()))),
    };
    if shift == 0 && !d.is_whole() {
        return Err(err(Problem::FractionalBytes));
    }
    d.scale_to_u64(1u128 << shift, 1)
        .ok_or_else(|| err(Problem::TooLarge))
}

/// Parses a rate into bytes per second (see the [module docs](self): bits are decimal,
/// `MB/s` decimal bytes, `MiB/s` binary bytes, a bare number bytes per second).
pub fn parse_rate(input: &str) -> Result<u64, UnitError> {
    let q = Quantity::Rate;
    let err = |problem| UnitError {
        quantity: q,
        input: input.to_string(),
        problem,
    };
    let (d, unit) = split(input, q)?;
    let (num, den) = rate_unit(unit).ok_or_else(|| err(Problem::UnknownUnit(unit.to_string())))?;
    match d.scale_to_u64(num, den) {
        None => Err(err(Problem::TooLarge)),
        Some(0) => Err(err(Problem::Zero)),
        Some(v) => Ok(v),
    }
}

/// Like [`parse_rate`], but `none`, `unlimited` and `off` (any case) mean no limit.
pub fn parse_rate_limit(input: &str) -> Result<Option<u64>, UnitError> {
    let t = input.trim();
    if ["none", "unlimited", "off"]
        .iter()
        .any(|w| t.eq_ignore_ascii_case(w))
    {
        return Ok(None);
    }
    parse_rate(input).map(Some)
}

/// Bytes per second for one unit of a rate: `(numerator, denominator)`.
fn rate_unit(unit: &str) -> Option<(u128, u128)> {
    if unit.is_empty() {
        return Some((1, 1));
    }
    let (prefix, rest) = match unit.as_bytes()[0].to_ascii_lowercase() {
        c @ (b'k' | b'm' | b'g' | b't') => (Some(c), &unit[1..]),
        _ => (None, unit),
    };
    let (binary, base) = match rest.strip_prefix('i') {
        Some(b) if prefix.is_some() => (true, b),
        _ => (false, rest),
    };
    let lower = base.to_ascii_lowercase();
    let bits = match (base, lower.as_str()) {
        (_, "bit" | "bits" | "bit/s" | "bits/s") => true,
        ("b/s" | "bps", _) => true,
        ("B/s" | "B/S" | "Bps", _) => false,
        _ => return None,
    };
    let exp = match prefix {
        None => 0,
        Some(b'k') => 1,
        Some(b'm') => 2,
        Some(b'g') => 3,
        _ => 4,
    };
    let scale = if binary {
        1u128 << (10 * exp)
    } else {
        1000u128.pow(exp)
    };
    Some((scale, if bits { 8 } else { 1 }))
}

/// Parses a duration: a number with a unit (`300ms`, `2s`, `1.5s`; see the
/// [module docs](self)).
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let q = Quantity::Duration;
    let err = |problem| UnitError {
        quantity: q,
        input: input.to_string(),
        problem,
    };
    let (d, unit) = split(input, q)?;
    let nanos: u128 = match unit.to_ascii_lowercase().as_str() {
        "" => return Err(err(Problem::MissingUnit)),
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" | "sec" | "secs" => 1_000_000_000,
        "m" | "min" | "mins" => 60_000_000_000,
        "h" | "hr" | "hrs" => 3_600_000_000_000,
        _ => return Err(err(Problem::UnknownUnit(unit.to_string()))),
    };
    d.scale_to_u64(nanos, 1)
        .map(Duration::from_nanos)
        .ok_or_else(|| err(Problem::TooLarge))
}

/// A byte count for people: `512 B`, `1.00 GiB`, `117.74 MiB` (binary units, two decimals).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut value = bytes as f64 / 1024.0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.999 KiB would print as 1024.00 KiB: say 1.00 MiB instead.
    if format!("{value:.2}") == "1024.00" && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// Three significant digits, more for large values: `940`, `94.0`, `9.40`.
fn three_digits(v: f64) -> String {
    if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A rate for people, in bits (decimal, as links are sold) and bytes:
/// `940 Mbit/s (117.5 MB/s)`. Negative or non-finite input prints as `-`.
pub fn format_rate(bytes_per_sec: f64) -> String {
    if !bytes_per_sec.is_finite() || bytes_per_sec < 0.0 {
        return "-".to_string();
    }
    const BITS: [&str; 5] = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"];
    const BYTES: [&str; 5] = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let pick = |mut v: f64| {
        let mut i = 0;
        // Switch units at 999.5 so that rounding never prints "1000".
        while v >= 999.5 && i + 1 < BITS.len() {
            v /= 1000.0;
            i += 1;
        }
        (v, i)
    };
    let (bits, bi) = pick(bytes_per_sec * 8.0);
    let (bytes, yi) = pick(bytes_per_sec);
    let bits_text = if bi == 0 {
        format!("{bits:.0}")
    } else {
        three_digits(bits)
    };
    let bytes_text = if yi == 0 {
        format!("{bytes:.0}")
    } else {
        format!("{bytes:.1}")
    };
    format!("{bits_text} {} ({bytes_text} {})", BITS[bi], BYTES[yi])
}

/// A duration for people: `850 us`, `340 ms`, `1.52 s`, `2 min 05 s`, `1 h 02 min`.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    let secs = d.as_secs();
    if us < 1_000 {
        format!("{us} us")
    } else if us < 1_000_000 {
        format!("{} ms", d.as_millis())
    } else if secs < 60 {
        format!("{:.2} s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{} min {:02} s", secs / 60, secs % 60)
    } else {
        format!("{} h {:02} min", secs / 3600, (secs % 3600) / 60)
    }
}

/// Serde helpers for configs: each field accepts a number (bytes, bytes per second) or a
/// string in the forms above. Use with `#[serde(deserialize_with = "...")]`.
pub mod de {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{Deserializer, Error, Visitor};

    /// A number of bytes (per second), or a string for `parse`.
    struct Numeric<F>(&'static str, F);

    impl<'de, F: Fn(&str) -> Result<u64, super::UnitError>> Visitor<'de> for Numeric<F> {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} cannot be negative")))
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<u64, E> {
            (self.1)(v).map_err(E::custom)
        }
    }

    /// A size: `1073741824` or `"1GiB"`.
    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(Numeric(
            "a size like \"1GiB\" or a byte count",
            super::parse_size,
        ))
    }

    /// A rate in bytes per second: `125000000` or `"1Gbit"`.
    pub fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(Numeric(
            "a rate like \"1Gbit\" or bytes per second",
            super::parse_rate,
        ))
    }

    /// An optional rate limit: `"none"`, `"1Gbit"` or bytes per second.
    pub fn rate_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        struct Limit;
        impl<'de> Visitor<'de> for Limit {
            type Value = Option<u64>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate like \"1Gbit\", \"none\", or bytes per second")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Option<u64>, E> {
                Ok(Some(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Option<u64>, E> {
                u64::try_from(v)
                    .map(Some)
                    .map_err(|_| E::custom(format!("{v} cannot be negative")))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Option<u64>, E> {
                super::parse_rate_limit(v).map_err(E::custom)
            }
            fn visit_none<E: Error>(self) -> Result<Option<u64>, E> {
                Ok(None)
            }
            fn visit_unit<E: Error>(self) -> Result<Option<u64>, E> {
                Ok(None)
            }
        }
        d.deserialize_any(Limit)
    }

    /// A duration: `"300ms"`, `"2s"` (strings only: a bare number has no unit).
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Dur;
        impl<'de> Visitor<'de> for Dur {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"300ms\" or \"2s\"")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Duration, E> {
                super::parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Dur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    #[test]
    fn sizes_in_every_spelling() {
        let cases = [
            ("4096", 4096),
            ("0", 0),
            ("100k", 100 * KIB),
            ("100K", 100 * KIB),
            ("100KB", 100 * KIB),
            ("100kib", 100 * KIB),
            ("512M", 512 * MIB),
            ("512m", 512 * MIB),
            ("512MB", 512 * MIB),
            ("256MiB", 256 * MIB),
            ("256mib", 256 * MIB),
            ("4G", 4 * GIB),
            ("4g", 4 * GIB),
            ("1GiB", GIB),
            ("1GB", GIB),
            ("1.5GiB", 3 * GIB / 2),
            ("0.5G", GIB / 2),
            ("2T", 2 * TIB),
            ("1TiB", TIB),
            ("1PiB", 1 << 50),
            ("8E", 8 << 60),
            ("12B", 12),
            ("12 bytes", 12),
            ("  256 MiB  ", 256 * MIB),
            ("007K", 7 * KIB),
            ("1.0", 1),
            ("16777215.999999TiB", 18_446_744_073_708_452_104),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn size_fractions_round_to_the_nearest_byte() {
        // 0.1 KiB = 102.4 bytes; 0.3 KiB = 307.2; 0.0005 KiB = 0.512.
        assert_eq!(parse_size("0.1K"), Ok(102));
        assert_eq!(parse_size("0.3k"), Ok(307));
        assert_eq!(parse_size("0.0005K"), Ok(1));
        assert_eq!(parse_size("1.3GiB"), Ok(1_395_864_371));
        // Digits past 18 decimals are dropped, not an overflow.
        assert_eq!(parse_size("1.0000000000000000000000000001G"), Ok(GIB));
    }

    #[test]
    fn sizes_refused_with_a_clear_message() {
        let cases = [
            ("12XB", Problem::UnknownUnit("XB".into())),
            ("", Problem::Empty),
            ("   ", Problem::Empty),
            ("-1", Problem::Negative),
            ("-1G", Problem::Negative),
            ("NaN", Problem::NotANumber),
            ("inf", Problem::NotANumber),
            ("G", Problem::NotANumber),
            (".5G", Problem::NotANumber),
            ("1.G", Problem::NotANumber),
            ("1.2.3G", Problem::NotANumber),
            ("+5G", Problem::NotANumber),
            ("1e9", Problem::UnknownUnit("e9".into())),
            ("1 GiB extra", Problem::UnknownUnit("GiB extra".into())),
            ("5Gbit", Problem::UnknownUnit("Gbit".into())),
            ("1.5", Problem::FractionalBytes),
            ("16EiB", Problem::TooLarge),
            ("18446744073709551616", Problem::TooLarge),
            (
                "99999999999999999999999999999999999999999999",
                Problem::TooLarge,
            ),
        ];
        for (s, problem) in cases {
            let e = parse_size(s).expect_err(s);
            assert_eq!(e.problem, problem, "{s}");
            assert_eq!(e.quantity, Quantity::Size);
            assert_eq!(e.input, s);
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_size("12XB").unwrap_err().to_string(),
            "invalid size \"12XB\": unknown unit \"XB\"; use a number with an optional unit, \
             like 256MiB, 1GiB or 4G"
        );
        assert_eq!(
            parse_size("-3G").unwrap_err().to_string(),
            "invalid size \"-3G\": it cannot be negative; use a number with an optional unit, \
             like 256MiB, 1GiB or 4G"
        );
    }

    #[test]
    fn long_input_is_cut_in_the_message() {
        let long = "x".repeat(1000);
        let msg = parse_size(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
        assert!(msg.contains("xxx...\""), "{msg}");
    }

    #[test]
    fn rates_bits_are_decimal_bytes_as_written() {
        let cases = [
            ("1000000", 1_000_000),
            ("100Mbit", 12_500_000),
            ("100mbit", 12_500_000),
            ("100Mbits", 12_500_000),
            ("1Gbit", 125_000_000),
            ("1gbit", 125_000_000),
            ("10Gbit/s", 1_250_000_000),
            ("10Gbps", 1_250_000_000),
            ("100Mbps", 12_500_000),
            ("100Mb/s", 12_500_000),
            ("300kbit", 37_500),
            ("300Kbit", 37_500),
            ("8bit", 1),
            ("1Tbit", 125_000_000_000),
            ("500MB/s", 500_000_000),
            ("500MBps", 500_000_000),
            ("12.5MB/s", 12_500_000),
            ("500MiB/s", 500 * MIB),
            ("1GiB/s", GIB),
            ("1KiB/s", KIB),
            ("1Mibit", MIB / 8),
            ("2 Gbit/s", 250_000_000),
            ("1.5Gbit", 187_500_000),
            ("100 B/s", 100),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn rates_refused() {
        let cases = [
            ("", Problem::Empty),
            ("-1Gbit", Problem::Negative),
            ("0", Problem::Zero),
            ("0Mbit", Problem::Zero),
            ("1bit", Problem::Zero),
            ("nan", Problem::NotANumber),
            ("Gbit", Problem::NotANumber),
            ("500MB", Problem::UnknownUnit("MB".into())),
            ("100M", Problem::UnknownUnit("M".into())),
            ("1Xbit", Problem::UnknownUnit("Xbit".into())),
            ("1Bit/s2", Problem::UnknownUnit("Bit/s2".into())),
            ("99999999999Tbit", Problem::TooLarge),
            ("18446744073709551616", Problem::TooLarge),
        ];
        for (s, problem) in cases {
            let e = parse_rate(s).expect_err(s);
            assert_eq!(e.problem, problem, "{s}");
        }
        let msg = parse_rate("fast").unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid rate \"fast\": not a number; use a number with a unit, like 100Mbit, \
             1Gbit/s, 500MB/s or 500MiB/s (a bare number is bytes per second)"
        );
    }

    #[test]
    fn rate_limits_accept_none() {
        assert_eq!(parse_rate_limit("none"), Ok(None));
        assert_eq!(parse_rate_limit(" Unlimited "), Ok(None));
        assert_eq!(parse_rate_limit("off"), Ok(None));
        assert_eq!(parse_rate_limit("1Gbit"), Ok(Some(125_000_000)));
        assert!(parse_rate_limit("nope").is_err());
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        let cases = [
            ("300ms", ms(300)),
            ("2s", ms(2000)),
            ("1.5s", ms(1500)),
            ("1.5 s", ms(1500)),
            ("0.25ms", Duration::from_micros(250)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("2min", ms(120_000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("0s", Duration::ZERO),
            ("1.0000000001s", Duration::from_nanos(1_000_000_000)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        for (s, problem) in [
            ("300", Problem::MissingUnit),
            ("", Problem::Empty),
            ("-1s", Problem::Negative),
            ("1d", Problem::UnknownUnit("d".into())),
            ("NaNs", Problem::NotANumber),
            ("99999999999h", Problem::TooLarge),
        ] {
            assert_eq!(parse_duration(s).unwrap_err().problem, problem, "{s}");
        }
        assert_eq!(
            parse_duration("300").unwrap_err().to_string(),
            "invalid duration \"300\": the unit is missing; use a number with a unit, like \
             300ms, 2s or 1.5s"
        );
    }

    #[test]
    fn format_size_picks_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.00 KiB");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(GIB), "1.00 GiB");
        assert_eq!(format_size(256 * MIB), "256.00 MiB");
        assert_eq!(format_size(MIB - 1), "1.00 MiB");
        assert_eq!(format_size(u64::MAX), "16.00 EiB");
        // What it prints parses back to about the same size.
        for b in [1500, 3 * MIB + 12345, 7 * GIB / 3, 5 * TIB] {
            let back = parse_size(&format_size(b)).unwrap();
            let err = back.abs_diff(b) as f64 / b as f64;
            assert!(err < 0.005, "{b} -> {} -> {back}", format_size(b));
        }
    }

    #[test]
    fn format_rate_in_bits_and_bytes() {
        assert_eq!(format_rate(117_500_000.0), "940 Mbit/s (117.5 MB/s)");
        assert_eq!(format_rate(125_000_000.0), "1.00 Gbit/s (125.0 MB/s)");
        assert_eq!(format_rate(12_500_000.0), "100 Mbit/s (12.5 MB/s)");
        assert_eq!(format_rate(1_260_000.0), "10.1 Mbit/s (1.3 MB/s)");
        assert_eq!(format_rate(0.0), "0 bit/s (0 B/s)");
        assert_eq!(format_rate(100.0), "800 bit/s (100 B/s)");
        assert_eq!(format_rate(124_990.0), "1.00 Mbit/s (125.0 kB/s)");
        assert_eq!(format_rate(f64::NAN), "-");
        assert_eq!(format_rate(-1.0), "-");
        assert_eq!(format_rate(f64::INFINITY), "-");
        // It parses back (bits part).
        let text = format_rate(117_500_000.0);
        let bits = text.split(" (").next().unwrap().replace(' ', "");
        assert_eq!(parse_rate(&bits), Ok(117_500_000));
    }

    #[test]
    fn format_duration_scales() {
        assert_eq!(format_duration(Duration::from_micros(850)), "850 us");
        assert_eq!(format_duration(Duration::from_millis(340)), "340 ms");
        assert_eq!(format_duration(Duration::from_millis(1520)), "1.52 s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2 min 05 s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1 h 02 min");
    }

    #[test]
    fn serde_helpers_take_numbers_and_strings() {
        use serde::de::IntoDeserializer;
        use serde::de::value::Error;

        let s = |v: &'static str| de::size(v.into_deserializer());
        assert_eq!(s("1GiB").map_err(|e: Error| e.to_string()), Ok(GIB));
        let err = s("1XB").unwrap_err().to_string();
        assert!(err.starts_with("invalid size \"1XB\""), "{err}");
        assert_eq!(
            de::size(4096u64.into_deserializer()).map_err(|e: Error| e.to_string()),
            Ok(4096)
        );
        let negative: Result<u64, Error> = de::size((-1i64).into_deserializer());
        assert!(negative.is_err());
        assert_eq!(
            de::rate("1Gbit".into_deserializer()).map_err(|e: Error| e.to_string()),
            Ok(125_000_000)
        );
        assert_eq!(
            de::rate_limit("none".into_deserializer()).map_err(|e: Error| e.to_string()),
            Ok(None)
        );
        assert_eq!(
            de::rate_limit(1000u64.into_deserializer()).map_err(|e: Error| e.to_string()),
            Ok(Some(1000))
        );
        assert_eq!(
            de::duration("300ms".into_deserializer()).map_err(|e: Error| e.to_string()),
            Ok(Duration::from_millis(300))
        );
        let bare: Result<Duration, Error> = de::duration("300".into_deserializer());
        assert!(bare.is_err());
    }

    #[test]
    fn forms_the_general_crates_read_differently_stay_as_documented() {
        // Binary whatever the spelling (bytesize would read 512MB as 512,000,000 bytes).
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size(" 1.5 GiB "), Ok(3 << 29));
        // Fractions of a unit (humantime refuses them).
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5 min"), Ok(Duration::from_secs(30)));
        // The case of b/B alone decides bits or bytes.
        assert_eq!(parse_rate("100Mb/s"), Ok(12_500_000));
        assert_eq!(parse_rate("100MB/s"), Ok(100_000_000));
        assert_eq!(parse_rate("10Gbps"), Ok(1_250_000_000));
        // Every error quotes the input and shows an accepted form.
        let e = parse_duration("5").unwrap_err().to_string();
        assert!(e.contains("\"5\"") && e.contains("like 300ms"), "{e}");
        // What the tables print.
        assert_eq!(format_duration(Duration::from_millis(14_950)), "14.95 s");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
