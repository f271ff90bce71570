//! Human-friendly sizes and durations in the configuration file, sans IO:
//! a size is a whole number of bytes or a string like `"10 GiB"`,
//! `"500 MB"`; a duration is a whole number of seconds or a string like
//! `"90s"`, `"15 min"`, `"1h"`, `"2 d"`.

use serde::Deserialize;

/// A size or duration as written: a number or a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    /// A plain number (bytes, or seconds).
    Number(u64),
    /// A number with a unit.
    Text(String),
}

fn split(s: &str) -> Option<(u64, String)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..end].parse().ok()?;
    Some((n, s[end..].trim().to_ascii_lowercase()))
}

/// Bytes in a size.
pub fn size(a: &Amount) -> Result<u64, String> {
    let s = match a {
        Amount::Number(n) => return Ok(*n),
        Amount::Text(s) => s,
    };
    let bad = || format!("{s:?} is not a size like 1073741824, \"10 GiB\" or \"500 MB\"");
    let (n, unit) = split(s).ok_or_else(bad)?;
    let mul: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).ok_or_else(bad)
}

/// Seconds in a duration.
pub fn seconds(a: &Amount) -> Result<u64, String> {
    let s = match a {
        Amount::Number(n) => return Ok(*n),
        Amount::Text(s) => s,
    };
    let bad = || format!("{s:?} is not a duration like 3600, \"90s\", \"15 min\" or \"1h\"");
    let (n, unit) = split(s).ok_or_else(bad)?;
    let mul: u64 = match unit.as_str() {
        "" | "s" | "sec" | "secs" => 1,
        "m" | "min" | "mins" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        let t = |s: &str| Amount::Text(s.into());
        assert_eq!(size(&Amount::Number(5)), Ok(5));
        assert_eq!(size(&t("10 GiB")), Ok(10 << 30));
        assert_eq!(size(&t("500MB")), Ok(500_000_000));
        assert!(size(&t("ten")).is_err());
        assert!(size(&t("5 XB")).is_err());
        assert!(size(&t("99999999999 TiB")).is_err());
        assert_eq!(seconds(&t("1h")), Ok(3600));
        assert_eq!(seconds(&t("15 min")), Ok(900));
        assert_eq!(seconds(&Amount::Number(3)), Ok(3));
        assert!(seconds(&t("1 fortnight")).is_err());
    }
}
