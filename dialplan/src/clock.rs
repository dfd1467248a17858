//! The time helpers: the node's clock (passed in the call's facts) read in the customer's
//! time zone. The time zone database is compiled in (jiff's bundled copy), so a node
//! without the system's tzdata still knows every zone, and every node the same ones.

use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::call::Call;

/// The local time of a call, in the parts the script functions return.
pub struct Local {
    pub hour: i64,
    pub minute: i64,
    /// `mon` … `sun`.
    pub weekday: &'static str,
    /// 1 (Monday) … 7 (Sunday), as ISO 8601 counts.
    pub day_of_week: i64,
    /// `YYYY-MM-DD`.
    pub date: String,
}

/// `call.now_ms` in `call.time_zone` (UTC if that is empty or unknown: the node checks
/// a customer's zone when it is saved).
pub fn local(call: &Call) -> Local {
    let tz = TimeZone::get(&call.time_zone).unwrap_or(TimeZone::UTC);
    let ts = Timestamp::from_millisecond(call.now_ms).unwrap_or(Timestamp::UNIX_EPOCH);
    let z = ts.to_zoned(tz);
    let day = i64::from(z.weekday().to_monday_one_offset());
    Local {
        hour: i64::from(z.hour()),
        minute: i64::from(z.minute()),
        weekday: ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(day - 1) as usize],
        day_of_week: day,
        date: z.date().to_string(),
    }
}

/// Minutes since midnight of `HH:MM` (00:00 to 24:00).
pub fn parse_hhmm(text: &str) -> Result<i64, String> {
    let bad = || format!("'{text}' is not a time of day HH:MM");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: i64 = h.parse().map_err(|_| bad())?;
    let m: i64 = m.parse().map_err(|_| bad())?;
    if !(0..=24).contains(&h) || !(0..60).contains(&m) || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Whether minute-of-day `now` is in [from, to): a range that ends before it starts
/// wraps past midnight (22:00 to 06:00 is the night).
pub fn between(now: i64, from: i64, to: i64) -> bool {
    if from <= to {
        from <= now && now < to
    } else {
        now >= from || now < to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_time_follows_the_zone_and_its_daylight_saving() {
        // 2026-07-06 07:30 UTC is a Monday, 09:30 in Berlin (summer time).
        let mut call = Call {
            now_ms: 1_783_323_000_000,
            time_zone: "Europe/Berlin".into(),
            ..Call::default()
        };
        let l = local(&call);
        assert_eq!(
            (l.hour, l.minute, l.weekday, l.day_of_week),
            (9, 30, "mon", 1)
        );
        assert_eq!(l.date, "2026-07-06");
        // 2026-12-06 23:30 UTC is a Sunday, already Monday 00:30 in Berlin (winter time).
        call.now_ms = 1_796_599_800_000;
        let l = local(&call);
        assert_eq!(
            (l.hour, l.weekday, l.date.as_str()),
            (0, "mon", "2026-12-07")
        );
        call.time_zone = "Not/AZone".into();
        assert_eq!(local(&call).hour, 23);
    }

    #[test]
    fn ranges_of_the_day_wrap_past_midnight() {
        let t = |s| parse_hhmm(s).unwrap();
        assert!(between(t("09:00"), t("08:00"), t("18:00")));
        assert!(!between(t("18:00"), t("08:00"), t("18:00")));
        assert!(between(t("23:00"), t("22:00"), t("06:00")));
        assert!(between(t("05:59"), t("22:00"), t("06:00")));
        assert!(!between(t("12:00"), t("22:00"), t("06:00")));
        assert_eq!(t("24:00"), 1440);
        for bad in ["9", "25:00", "24:01", "09:60", "9:5", "aa:bb", "", "123:00"] {
            assert!(parse_hhmm(bad).is_err(), "{bad}");
        }
    }
}
