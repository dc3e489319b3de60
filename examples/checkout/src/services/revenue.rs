//! A late projection: revenue per hour, built by a service that did not exist while the
//! orders were taken.
//!
//! It keeps no state of its own: at start it reads `payments.completed` from the first
//! offset of every partition up to the end as it was at start, and builds its view from
//! the log alone — the log is the source of truth, a new read model is a replay away.
//! With `--follow` it then keeps reading and updates the view as payments arrive.
//! Events are counted once by event id: the outbox publishes at least once.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;

use strata_client::{Client, StartAt};
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::events::{topics, types, Event, PaymentCompleted};

const HOUR_MS: i64 = 60 * 60 * 1000;

/// Revenue of one hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HourRevenue {
    /// Payments completed in the hour.
    pub payments: u64,
    /// Their sum, in cents.
    pub cents: i64,
}

/// The view: revenue per hour (UTC).
#[derive(Debug, Clone, Default)]
pub struct Revenue {
    hours: BTreeMap<i64, HourRevenue>,
    seen: HashSet<String>,
    /// Events seen again (the same event id) and not counted twice.
    pub duplicates: u64,
    /// Records that are not decodable `payment.completed` events.
    pub skipped: u64,
}

impl Revenue {
    /// Adds one event; returns whether it counted (false: a repeat, or not a payment).
    pub fn apply(&mut self, event: &Event) -> bool {
        let paid: PaymentCompleted =
            match crate::consume::decode_as(event, types::PAYMENT_COMPLETED) {
                Ok(paid) => paid,
                Err(e) => {
                    tracing::warn!(error = %e, "revenue: skipping a record");
                    self.skipped += 1;
                    return false;
                }
            };
        if !self.seen.insert(event.id.clone()) {
            self.duplicates += 1;
            return false;
        }
        let hour = self
            .hours
            .entry(paid.occurred_at_ms.div_euclid(HOUR_MS))
            .or_default();
        hour.payments += 1;
        hour.cents += paid.amount_cents;
        true
    }

    /// Every payment counted.
    pub fn payments(&self) -> u64 {
        self.hours.values().map(|h| h.payments).sum()
    }

    /// The sum of every payment, in cents.
    pub fn total_cents(&self) -> i64 {
        self.hours.values().map(|h| h.cents).sum()
    }

    /// The hours, oldest first, as (start of the hour in ms since the epoch, revenue).
    pub fn hours(&self) -> impl Iterator<Item = (i64, HourRevenue)> + '_ {
        self.hours.iter().map(|(h, r)| (h * HOUR_MS, *r))
    }

    /// A table for people.
    pub fn render(&self) -> String {
        let mut out = String::from("HOUR (UTC)          PAYMENTS        REVENUE\n");
        for (start_ms, hour) in self.hours() {
            let _ = writeln!(
                out,
                "{:<16} {:>11} {:>14}",
                hour_label(start_ms),
                hour.payments,
                euros(hour.cents)
            );
        }
        let _ = writeln!(
            out,
            "{:<16} {:>11} {:>14}",
            "total",
            self.payments(),
            euros(self.total_cents())
        );
        if self.duplicates > 0 || self.skipped > 0 {
            let _ = writeln!(
                out,
                "({} repeated events not counted twice, {} records skipped)",
                self.duplicates, self.skipped
            );
        }
        out
    }
}

/// Builds the view from `payments.completed`, from the first offset of every partition
/// to the end as it is now.
pub async fn replay(client: &Client) -> Result<(Revenue, Vec<u64>)> {
    let description = client
        .admin()
        .describe_topic(topics::PAYMENTS_COMPLETED)
        .await?;
    let mut revenue = Revenue::default();
    let mut ends = Vec::with_capacity(description.partitions.len());
    for partition in &description.partitions {
        ends.push(partition.latest_offset);
        if partition.latest_offset <= partition.earliest_offset {
            continue;
        }
        let mut records = client
            .partition_consumer(
                topics::PAYMENTS_COMPLETED,
                partition.partition,
                StartAt::Earliest,
            )
            .await?;
        while let Some(record) = records.next().await {
            let record = record?;
            let offset = record.offset;
            match Event::parse(record) {
                Ok(event) => {
                    revenue.apply(&event);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revenue: skipping a record");
                    revenue.skipped += 1;
                }
            }
            if offset + 1 >= partition.latest_offset {
                break;
            }
        }
    }
    Ok((revenue, ends))
}

/// Keeps `revenue` up to date from offsets `ends` on (as [`replay`] returned them),
/// calling `updated` after each payment, until `shutdown`.
pub async fn follow(
    client: &Client,
    revenue: &mut Revenue,
    ends: &[u64],
    mut updated: impl FnMut(&Revenue, &PaymentCompleted),
    shutdown: CancellationToken,
) -> Result<()> {
    let mut streams = StreamMap::new();
    for (partition, end) in ends.iter().enumerate() {
        let consumer = client
            .partition_consumer(
                topics::PAYMENTS_COMPLETED,
                partition as u32,
                StartAt::Offset(*end),
            )
            .await?;
        streams.insert(partition, consumer);
    }
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = streams.next() => next,
        };
        let Some((_, record)) = next else {
            return Ok(());
        };
        let Ok(event) = Event::parse(record?) else {
            revenue.skipped += 1;
            continue;
        };
        if revenue.apply(&event) {
            if let Ok(paid) = event.payload::<PaymentCompleted>() {
                updated(revenue, &paid);
            }
        }
    }
}

/// `12345` cents → `123.45 EUR`.
pub fn euros(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!("{sign}{}.{:02} EUR", cents / 100, cents % 100)
}

/// `YYYY-MM-DD HH:00` of a time in ms since the epoch, UTC.
pub fn hour_label(ms: i64) -> String {
    let hours = ms.div_euclid(HOUR_MS);
    let (days, hour) = (hours.div_euclid(24), hours.rem_euclid(24));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:00")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_client::{headers, ConsumedRecord};

    fn event(id: &str, amount_cents: i64, occurred_at_ms: i64) -> Event {
        let paid = PaymentCompleted {
            order_id: format!("o-{id}"),
            payment_id: format!("p-{id}"),
            customer_id: "alice".into(),
            amount_cents,
            seq: 2,
            occurred_at_ms,
        };
        let record = ConsumedRecord {
            topic: topics::PAYMENTS_COMPLETED.into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: None,
            value: Some(serde_json::to_vec(&paid).expect("encodes").into()),
            headers: vec![
                (headers::EVENT_ID.into(), id.to_string().into()),
                (headers::EVENT_TYPE.into(), types::PAYMENT_COMPLETED.into()),
                (headers::SCHEMA_VERSION.into(), "1".into()),
            ],
        };
        Event::parse(record).expect("a valid envelope")
    }

    #[test]
    fn sums_per_hour_and_counts_an_event_once() {
        let mut revenue = Revenue::default();
        let t = 1_767_225_600_000; // 2026-01-01 00:00 UTC
        assert!(revenue.apply(&event("a", 1000, t + 5)));
        assert!(revenue.apply(&event("b", 250, t + HOUR_MS - 1)));
        assert!(revenue.apply(&event("c", 99, t + HOUR_MS)));
        assert!(!revenue.apply(&event("a", 1000, t + 5)));
        assert_eq!(revenue.payments(), 3);
        assert_eq!(revenue.total_cents(), 1349);
        assert_eq!(revenue.duplicates, 1);
        let hours: Vec<_> = revenue.hours().collect();
        assert_eq!(hours.len(), 2);
        assert_eq!(hours[0].1.cents, 1250);
        assert_eq!(hour_label(hours[1].0), "2026-01-01 01:00");
        assert!(revenue.render().contains("13.49 EUR"));
    }

    #[test]
    fn labels_hours_and_amounts() {
        assert_eq!(hour_label(0), "1970-01-01 00:00");
        assert_eq!(hour_label(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(hour_label(-1), "1969-12-31 23:00");
        assert_eq!(euros(12_345), "123.45 EUR");
        assert_eq!(euros(5), "0.05 EUR");
        assert_eq!(euros(-150), "-1.50 EUR");
    }
}
