//! RFC 3339 timestamps in UTC, as Anthropic's API writes them
//! (`2024-08-20T18:37:24Z`, or with milliseconds for batch objects), without
//! a calendar crate: the civil date comes from Howard Hinnant's
//! `civil_from_days`.

/// Formats Unix milliseconds; `with_millis` adds a `.mmm` fraction.
pub fn format_unix_millis(ms: i64, with_millis: bool) -> String {
    let millis = ms.rem_euclid(1000);
    let Civil {
        year,
        month,
        day,
        hour: h,
        minute: m,
        second: s,
    } = Civil::from_unix_secs(ms.div_euclid(1000));
    if with_millis {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    }
}

/// A UTC date and time of day, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
}

impl Civil {
    pub fn from_unix_secs(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Self {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format_unix_millis as f;

    #[test]
    fn known_instants() {
        assert_eq!(f(0, false), "1970-01-01T00:00:00Z");
        assert_eq!(f(951_782_400_000, false), "2000-02-29T00:00:00Z");
        assert_eq!(f(1_724_179_044_100, true), "2024-08-20T18:37:24.100Z");
        assert_eq!(f(4_102_444_799_999, true), "2099-12-31T23:59:59.999Z");
        assert_eq!(f(-1, true), "1969-12-31T23:59:59.999Z");
    }
}
