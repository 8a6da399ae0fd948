//! Spend: what a request cost in US dollars, from the tokens Vertex reports
//! and the model's list prices, and the UTC calendar periods (day, month)
//! a tenant's spend caps are counted in.
//!
//! Why it is here, and why it is integers. Money is arithmetic that must
//! add up: a tenant's day is the sum of its requests, a fleet's the sum of
//! its replicas', and a cap compares one against a number an operator typed.
//! Floating point would make the sum depend on the order it was added in.
//! So a [`Price`] is an integer count of micro-dollars per million tokens —
//! which is exactly picodollars per token — and a [`Cost`] is an integer
//! count of picodollars: `cost(a) + cost(b) == cost(a + b)` holds exactly,
//! and a cost never falls when any token count rises (both are proptests
//! below). Totals kept across requests (stores, caps) are nanodollars
//! ([`Cost::nanodollars`], rounded half up once per request: at most half a
//! nanodollar off per request, where whole micro-dollars would be off by up
//! to half a Claude 3 Haiku *input token's* price twice over).
//!
//! What is priced is what Vertex bills for the request, token kind by token
//! kind: uncached input, output, cache writes (5-minute and 1-hour TTLs are
//! priced apart: 1.25× and 2× input on Anthropic's list), cache reads
//! (0.1× input). A model without prices has no spend: it is not given a
//! made-up one. Long-context surcharges (prompts above 200k tokens on the
//! 1M-context betas) are not modelled.
//!
//! Periods are UTC calendar days and months, computed here from Unix
//! milliseconds with no time-zone database (UTC has none to need), so a
//! rollover is a pure function of the time passed in: tests pass the
//! instant they mean.

use std::ops::{Add, AddAssign};

/// A price: micro-dollars per million tokens, which is picodollars per
/// token. `$0.25 / MTok` is `Price(250_000)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Price(pub u64);

impl Price {
    /// The most a price may be: $1,000,000 per million tokens (a dollar a
    /// token). Anything above is a typo, and refused by config validation.
    pub const MAX_USD_PER_MTOK: f64 = 1_000_000.0;

    /// `usd` dollars per million tokens, to the micro-dollar; `None` if it
    /// is negative, not finite or above [`Price::MAX_USD_PER_MTOK`].
    pub fn from_usd_per_mtok(usd: f64) -> Option<Self> {
        (usd.is_finite() && (0.0..=Self::MAX_USD_PER_MTOK).contains(&usd))
            .then(|| Self((usd * 1e6).round() as u64))
    }

    pub fn usd_per_mtok(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// This price raised by `fraction` (0.1: 10% more), to the micro-dollar.
    pub fn raised(self, fraction: f64) -> Self {
        Self((self.0 as f64 * (1.0 + fraction)).round() as u64)
    }
}

/// A model's prices, one per kind of token Vertex bills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    /// Uncached input tokens.
    pub input: Price,
    pub output: Price,
    /// Cache writes with the default 5-minute TTL.
    pub cache_write_5m: Price,
    /// Cache writes with the 1-hour TTL (`cache_control.ttl = "1h"`).
    pub cache_write_1h: Price,
    /// Cache hits.
    pub cache_read: Price,
}

impl Prices {
    /// What `tokens` cost at these prices. Saturates instead of wrapping
    /// (at $18 million: no one request).
    pub fn cost(&self, tokens: &Tokens) -> Cost {
        let pico = [
            (tokens.input, self.input),
            (tokens.output, self.output),
            (tokens.cache_write_5m, self.cache_write_5m),
            (tokens.cache_write_1h, self.cache_write_1h),
            (tokens.cache_read, self.cache_read),
        ]
        .into_iter()
        .map(|(n, price)| u128::from(n) * u128::from(price.0))
        .sum::<u128>();
        Cost(u64::try_from(pico).unwrap_or(u64::MAX))
    }

    /// Every price raised by `fraction` (Vertex's regional premium).
    pub fn raised(&self, fraction: f64) -> Self {
        Self {
            input: self.input.raised(fraction),
            output: self.output.raised(fraction),
            cache_write_5m: self.cache_write_5m.raised(fraction),
            cache_write_1h: self.cache_write_1h.raised(fraction),
            cache_read: self.cache_read.raised(fraction),
        }
    }
}

/// A model's prices where it is served: on Vertex, regional and
/// multi-region endpoints of Claude 4.5 and later models cost a premium
/// over `global` (10% as of 2026).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelPrices {
    /// `global`, and locations that are not Vertex's.
    pub global: Prices,
    /// Regions and multi-regions (`us-east5`, `us`, `eu`).
    pub regional: Prices,
}

impl ModelPrices {
    /// The same prices everywhere.
    pub fn flat(prices: Prices) -> Self {
        Self {
            global: prices,
            regional: prices,
        }
    }

    /// `prices` on `global`, raised by `regional_premium` elsewhere.
    pub fn with_regional_premium(prices: Prices, regional_premium: f64) -> Self {
        Self {
            global: prices,
            regional: prices.raised(regional_premium),
        }
    }

    /// The prices at `location`: regional for a Vertex region or
    /// multi-region, global for `global` and for any other provider's
    /// location name.
    pub fn at(&self, location: &str) -> &Prices {
        use crate::catalog::LocationKind;
        match LocationKind::of(location) {
            Some(LocationKind::Regional | LocationKind::MultiRegion) => &self.regional,
            Some(LocationKind::Global) | None => &self.global,
        }
    }
}

/// Token counts by kind, as Vertex bills them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
}

impl Add for Tokens {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            input: self.input.saturating_add(o.input),
            output: self.output.saturating_add(o.output),
            cache_write_5m: self.cache_write_5m.saturating_add(o.cache_write_5m),
            cache_write_1h: self.cache_write_1h.saturating_add(o.cache_write_1h),
            cache_read: self.cache_read.saturating_add(o.cache_read),
        }
    }
}

/// An amount of money in picodollars (10⁻¹² USD).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cost(pub u64);

impl Cost {
    pub const ZERO: Cost = Cost(0);

    pub fn picodollars(self) -> u64 {
        self.0
    }

    /// Nanodollars (10⁻⁹ USD), rounded half up: the unit totals are kept in.
    pub fn nanodollars(self) -> u64 {
        self.0 / 1000 + u64::from(self.0 % 1000 >= 500)
    }

    pub fn usd(self) -> f64 {
        self.0 as f64 / 1e12
    }
}

impl Add for Cost {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Cost(self.0.saturating_add(o.0))
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, o: Self) {
        *self = *self + o;
    }
}

/// Nanodollars as US dollars.
pub fn usd_of_nanodollars(nanodollars: u64) -> f64 {
    nanodollars as f64 / 1e9
}

/// US dollars as nanodollars (for configured caps), or `None` if negative
/// or not finite.
pub fn nanodollars_of_usd(usd: f64) -> Option<u64> {
    (usd.is_finite() && (0.0..9.0e9).contains(&usd)).then(|| (usd * 1e9).round() as u64)
}

/// A UTC calendar period spend is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub const ALL: [Period; 2] = [Period::Day, Period::Month];

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The bounds `[start_ms, end_ms)` of the period of this kind that
    /// contains `unix_ms` (no allocation: for the request path).
    pub fn bounds(self, unix_ms: i64) -> (i64, i64) {
        let day = unix_ms.div_euclid(DAY_MS);
        match self {
            Period::Day => (day * DAY_MS, (day + 1) * DAY_MS),
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (
                    days_from_civil(y, m, 1) * DAY_MS,
                    days_from_civil(ny, nm, 1) * DAY_MS,
                )
            }
        }
    }

    /// The period of this kind that contains `unix_ms`, with its name.
    pub fn containing(self, unix_ms: i64) -> Span {
        let (start_ms, end_ms) = self.bounds(unix_ms);
        let (y, m, d) = civil_from_days(start_ms.div_euclid(DAY_MS));
        let key = match self {
            Period::Day => format!("{y:04}-{m:02}-{d:02}"),
            Period::Month => format!("{y:04}-{m:02}"),
        };
        Span {
            period: self,
            key,
            start_ms,
            end_ms,
        }
    }
}

const DAY_MS: i64 = 86_400_000;

/// One period: its name in stores (`2026-11-27`, `2026-11`) and its bounds
/// in Unix milliseconds, `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Span {
    pub period: Period,
    pub key: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Span {
    /// `day:2026-11-27` or `month:2026-11`: unique across kinds.
    pub fn store_key(&self) -> String {
        format!("{}:{}", self.period.name(), self.key)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (`civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A tenant's spend caps, in nanodollars; either may be absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpendCaps {
    pub per_day: Option<u64>,
    pub per_month: Option<u64>,
}

impl SpendCaps {
    pub fn is_empty(&self) -> bool {
        self.per_day.is_none() && self.per_month.is_none()
    }

    pub fn of(&self, period: Period) -> Option<u64> {
        match period {
            Period::Day => self.per_day,
            Period::Month => self.per_month,
        }
    }
}

/// A cap the tenant's spend has reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapReached {
    pub period: Period,
    /// Nanodollars.
    pub cap: u64,
    /// What the tenant has spent in the period, nanodollars.
    pub spent: u64,
    /// When the period ends and the cap starts over (Unix ms, UTC).
    pub resets_at_ms: i64,
}

/// Whether a tenant that has spent `spent(period)` may send another
/// request at `now_ms`: refused once any cap is reached (spent ≥ cap). When
/// both are, the month is named: retrying at the day's end would only meet
/// it again, so its reset is the honest retry time.
pub fn check_caps(
    caps: &SpendCaps,
    now_ms: i64,
    spent: impl Fn(Period) -> u64,
) -> Result<(), CapReached> {
    let mut reached = None;
    for period in Period::ALL {
        let Some(cap) = caps.of(period) else { continue };
        let spent = spent(period);
        if spent >= cap {
            reached = Some(CapReached {
                period,
                cap,
                spent,
                resets_at_ms: period.containing(now_ms).end_ms,
            });
        }
    }
    reached.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn haiku3() -> Prices {
        let p = |usd| Price::from_usd_per_mtok(usd).unwrap();
        Prices {
            input: p(0.25),
            output: p(1.25),
            cache_write_5m: p(0.30),
            cache_write_1h: p(0.50),
            cache_read: p(0.03),
        }
    }

    #[test]
    fn a_request_costs_its_tokens_at_their_prices() {
        let t = Tokens {
            input: 1_000_000,
            output: 1_000_000,
            cache_write_5m: 0,
            cache_write_1h: 0,
            cache_read: 0,
        };
        assert_eq!(haiku3().cost(&t).usd(), 1.50);
        // 16 in, 24 out: 16 × 0.25 µ$ + 24 × 1.25 µ$ = 34 µ$.
        let small = Tokens {
            input: 16,
            output: 24,
            ..Tokens::default()
        };
        assert_eq!(haiku3().cost(&small), Cost(34_000_000));
        assert_eq!(haiku3().cost(&small).nanodollars(), 34_000);
        // Cache kinds at their own prices.
        let cached = Tokens {
            cache_write_5m: 100,
            cache_write_1h: 10,
            cache_read: 1000,
            ..Tokens::default()
        };
        assert_eq!(
            haiku3().cost(&cached).picodollars(),
            100 * 300_000 + 10 * 500_000 + 1000 * 30_000
        );
    }

    #[test]
    fn prices_are_exact_to_the_micro_dollar_and_refuse_nonsense() {
        assert_eq!(Price::from_usd_per_mtok(0.3125), Some(Price(312_500)));
        assert_eq!(Price::from_usd_per_mtok(3.0).unwrap().usd_per_mtok(), 3.0);
        assert_eq!(Price::from_usd_per_mtok(0.0), Some(Price(0)));
        for bad in [-0.01, f64::NAN, f64::INFINITY, 2e6] {
            assert_eq!(Price::from_usd_per_mtok(bad), None, "{bad}");
        }
        assert_eq!(Price(3_000_000).raised(0.1), Price(3_300_000));
    }

    #[test]
    fn rounding_to_nanodollars_is_half_up() {
        assert_eq!(Cost(499).nanodollars(), 0);
        assert_eq!(Cost(500).nanodollars(), 1);
        assert_eq!(Cost(1_499).nanodollars(), 1);
        assert_eq!(nanodollars_of_usd(50.0), Some(50_000_000_000));
        assert_eq!(nanodollars_of_usd(-1.0), None);
        assert_eq!(usd_of_nanodollars(1_500_000_000), 1.5);
    }

    #[test]
    fn regional_locations_pay_the_premium_and_global_does_not() {
        let sonnet = Prices {
            input: Price(3_000_000),
            output: Price(15_000_000),
            ..Prices::default()
        };
        let m = ModelPrices::with_regional_premium(sonnet, 0.1);
        assert_eq!(m.at("global").input, Price(3_000_000));
        assert_eq!(m.at("us-east5").input, Price(3_300_000));
        assert_eq!(m.at("eu").output, Price(16_500_000));
        assert_eq!(m.at("elsewhere").input, Price(3_000_000));
    }

    #[test]
    fn days_and_months_are_utc_calendar_periods() {
        // 2026-11-27T23:59:59.999Z
        let t = days_from_civil(2026, 11, 27) * DAY_MS + DAY_MS - 1;
        let day = Period::Day.containing(t);
        assert_eq!(day.key, "2026-11-27");
        assert_eq!(day.end_ms, t + 1);
        assert_eq!(day.store_key(), "day:2026-11-27");
        assert_eq!(Period::Day.containing(t + 1).key, "2026-11-28");
        let month = Period::Month.containing(t);
        assert_eq!(month.key, "2026-11");
        assert_eq!(month.end_ms, days_from_civil(2026, 12, 1) * DAY_MS);
        // December rolls into January; February of a leap year has 29 days.
        let dec = Period::Month.containing(days_from_civil(2026, 12, 31) * DAY_MS);
        assert_eq!(dec.end_ms, days_from_civil(2027, 1, 1) * DAY_MS);
        let feb = Period::Month.containing(days_from_civil(2028, 2, 10) * DAY_MS);
        assert_eq!(feb.end_ms - feb.start_ms, 29 * DAY_MS);
        assert_eq!(Period::Day.containing(0).key, "1970-01-01");
        assert_eq!(Period::Day.containing(-1).key, "1969-12-31");
    }

    #[test]
    fn caps_refuse_once_reached_and_name_the_later_reset() {
        let caps = SpendCaps {
            per_day: Some(50),
            per_month: Some(1000),
        };
        let now = days_from_civil(2026, 11, 27) * DAY_MS + 3_600_000;
        assert!(check_caps(&caps, now, |_| 49).is_ok());
        let day = check_caps(&caps, now, |p| if p == Period::Day { 50 } else { 60 }).unwrap_err();
        assert_eq!(day.period, Period::Day);
        assert_eq!(day.resets_at_ms, days_from_civil(2026, 11, 28) * DAY_MS);
        let both = check_caps(&caps, now, |_| 1000).unwrap_err();
        assert_eq!(both.period, Period::Month);
        assert_eq!(both.resets_at_ms, days_from_civil(2026, 12, 1) * DAY_MS);
        assert!(check_caps(&SpendCaps::default(), now, |_| u64::MAX).is_ok());
    }

    fn tokens() -> impl Strategy<Value = Tokens> {
        let n = 0u64..10_000_000;
        (n.clone(), n.clone(), n.clone(), n.clone(), n).prop_map(|(a, b, c, d, e)| Tokens {
            input: a,
            output: b,
            cache_write_5m: c,
            cache_write_1h: d,
            cache_read: e,
        })
    }

    fn prices() -> impl Strategy<Value = Prices> {
        // Up to $1,000 per million tokens.
        let p = (0u64..1_000_000_000).prop_map(Price);
        (p.clone(), p.clone(), p.clone(), p.clone(), p).prop_map(|(a, b, c, d, e)| Prices {
            input: a,
            output: b,
            cache_write_5m: c,
            cache_write_1h: d,
            cache_read: e,
        })
    }

    proptest! {
        #[test]
        fn cost_is_additive(p in prices(), a in tokens(), b in tokens()) {
            prop_assert_eq!(p.cost(&(a + b)), p.cost(&a) + p.cost(&b));
        }

        #[test]
        fn cost_is_monotone(p in prices(), a in tokens(), more in tokens()) {
            let bigger = a + more;
            prop_assert!(p.cost(&bigger) >= p.cost(&a));
            prop_assert!(p.raised(0.1).cost(&a) >= p.cost(&a));
        }

        #[test]
        fn periods_contain_their_instant_and_tile_time(t in -5_000_000_000_000i64..10_000_000_000_000) {
            for period in Period::ALL {
                let s = period.containing(t);
                prop_assert!(s.start_ms <= t && t < s.end_ms);
                prop_assert_eq!(period.containing(s.end_ms).start_ms, s.end_ms);
                prop_assert_eq!(period.containing(s.end_ms - 1).key, s.key.clone());
            }
            let (y, m, d) = civil_from_days(t.div_euclid(DAY_MS));
            prop_assert_eq!(days_from_civil(y, m, d), t.div_euclid(DAY_MS));
        }
    }
}
