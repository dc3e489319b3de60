//! The events the services exchange: topics, types, payloads, and the envelope in record
//! headers.
//!
//! Every event is one record keyed by its order id (so one order's events stay in order
//! in one partition) with a JSON value and four headers: `event-id` (a UUID, for
//! deduplication), `event-type`, `schema-version` and `traceparent`. The payload
//! schemas are JSON Schema files in `schemas/`, one per type and version.
//!
//! Versioning rule: a new version of a type only adds fields, so a reader of any
//! version decodes every version (unknown fields are ignored, and readers never
//! require a field a later version added). Removing, renaming or retyping a field
//! makes a new event type instead. The order service writes `order.created` version 2;
//! the payment service reads it with the version 1 struct.
//!
//! Each payload carries its order's sequence number: `order.created` is 1, the payment
//! outcome 2, the release of stock 3. The order projection applies an event only if
//! its number is above the order's, so a stale, repeated or reordered event never moves
//! an order backwards.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use strata_client::{headers, ConsumedRecord};

use crate::error::{Error, Result};
use crate::trace::TraceContext;

/// Topic names.
pub mod topics {
    /// `order.created`, written by the order service's outbox.
    pub const ORDERS_CREATED: &str = "orders.created";
    /// `payment.completed`, written by the payment service.
    pub const PAYMENTS_COMPLETED: &str = "payments.completed";
    /// `payment.failed`, written by the payment service.
    pub const PAYMENTS_FAILED: &str = "payments.failed";
    /// `inventory.released`, written by the inventory service.
    pub const INVENTORY_RELEASED: &str = "inventory.released";
    /// Every topic of the checkout, created at start-up.
    pub const ALL: [&str; 4] = [
        ORDERS_CREATED,
        PAYMENTS_COMPLETED,
        PAYMENTS_FAILED,
        INVENTORY_RELEASED,
    ];
}

/// Event types (the `event-type` header).
pub mod types {
    /// An order was placed: PENDING, stock reserved.
    pub const ORDER_CREATED: &str = "order.created";
    /// The order was charged.
    pub const PAYMENT_COMPLETED: &str = "payment.completed";
    /// The charge was declined.
    pub const PAYMENT_FAILED: &str = "payment.failed";
    /// A failed order's stock is available again.
    pub const INVENTORY_RELEASED: &str = "inventory.released";
}

/// The schema version each type is written with now.
pub mod versions {
    /// `order.created`: version 2 added `currency` and `discount_cents`.
    pub const ORDER_CREATED: u32 = 2;
    /// `payment.completed`.
    pub const PAYMENT_COMPLETED: u32 = 1;
    /// `payment.failed`.
    pub const PAYMENT_FAILED: u32 = 1;
    /// `inventory.released`.
    pub const INVENTORY_RELEASED: u32 = 1;
}

/// Per-order sequence numbers (the `seq` field).
pub mod seq {
    /// `order.created`.
    pub const CREATED: i64 = 1;
    /// `payment.completed` or `payment.failed`.
    pub const PAYMENT: i64 = 2;
    /// `inventory.released`.
    pub const RELEASED: i64 = 3;
}

/// The currency of every price in the sample.
pub const CURRENCY: &str = "EUR";

/// One line of an order, priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub sku: String,
    /// How many, at least 1.
    pub quantity: i64,
    /// The price of one, in cents.
    pub unit_price_cents: i64,
}

/// A quantity of one product, as reserved and released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: i64,
}

/// `order.created`, version 1 (`schemas/order.created.v1.json`): what every reader of
/// the type relies on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreatedV1 {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// What was ordered.
    pub lines: Vec<OrderLine>,
    /// What to charge, in cents.
    pub total_cents: i64,
    /// The payment method's token.
    pub payment_token: String,
    /// Per-order sequence number: [`seq::CREATED`].
    pub seq: i64,
    /// When the order was placed (ms since the Unix epoch).
    pub created_at_ms: i64,
}

/// `order.created`, version 2 (`schemas/order.created.v2.json`): version 1 plus the
/// currency and the discount granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreatedV2 {
    /// Every field of version 1.
    #[serde(flatten)]
    pub v1: OrderCreatedV1,
    /// ISO 4217 currency of every amount.
    pub currency: String,
    /// The discount included in `total_cents`.
    pub discount_cents: i64,
}

/// `payment.completed`, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCompleted {
    /// The order paid.
    pub order_id: String,
    /// The payment's id.
    pub payment_id: String,
    /// Who paid.
    pub customer_id: String,
    /// The amount charged, in cents.
    pub amount_cents: i64,
    /// Per-order sequence number: [`seq::PAYMENT`].
    pub seq: i64,
    /// When it was charged (ms since the Unix epoch).
    pub occurred_at_ms: i64,
}

/// `payment.failed`, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The order not paid.
    pub order_id: String,
    /// The payment attempt's id.
    pub payment_id: String,
    /// Who was to pay.
    pub customer_id: String,
    /// The amount declined, in cents.
    pub amount_cents: i64,
    /// Why, for people.
    pub reason: String,
    /// Per-order sequence number: [`seq::PAYMENT`].
    pub seq: i64,
    /// When it was declined (ms since the Unix epoch).
    pub occurred_at_ms: i64,
}

/// `inventory.released`, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    /// The order whose reservation was released.
    pub order_id: String,
    /// What is available again.
    pub lines: Vec<StockLine>,
    /// Per-order sequence number: [`seq::RELEASED`].
    pub seq: i64,
    /// When (ms since the Unix epoch).
    pub occurred_at_ms: i64,
}

/// An event to publish, as the outbox stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// A new UUID: the `event-id` header.
    pub event_id: String,
    /// Where it goes.
    pub topic: String,
    /// The record key: the order id.
    pub key: String,
    /// The `event-type` header.
    pub event_type: String,
    /// The `schema-version` header.
    pub schema_version: u32,
    /// The `traceparent` header: the span that caused the event.
    pub traceparent: String,
    /// The JSON payload.
    pub payload: String,
}

impl Outgoing {
    /// An event of `event_type` at `version` about order `key`, caused by `trace`.
    pub fn new<T: Serialize>(
        topic: &str,
        event_type: &str,
        version: u32,
        key: &str,
        trace: &TraceContext,
        payload: &T,
    ) -> Result<Outgoing> {
        let payload = serde_json::to_string(payload)
            .map_err(|e| Error::BadEvent(format!("cannot encode {event_type}: {e}")))?;
        Ok(Outgoing {
            event_id: uuid::Uuid::new_v4().to_string(),
            topic: topic.to_string(),
            key: key.to_string(),
            event_type: event_type.to_string(),
            schema_version: version,
            traceparent: trace.to_string(),
            payload,
        })
    }
}

/// A consumed record whose envelope (headers) is valid.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `event-id` header.
    pub id: String,
    /// The `event-type` header.
    pub event_type: String,
    /// The `schema-version` header, at least 1.
    pub schema_version: u32,
    /// The trace context its producer sent (the `traceparent` header), or a new trace
    /// if there was none: its trace id is the one to log.
    pub trace: TraceContext,
    /// The record.
    pub record: ConsumedRecord,
}

impl Event {
    /// Checks the envelope: `event-id`, `event-type` and a `schema-version` of 1 or
    /// more must be there. A record without them can never be processed
    /// ([`Error::BadEvent`]).
    pub fn parse(record: ConsumedRecord) -> Result<Event> {
        let header = |name: &str| {
            record
                .header_str(name)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| Error::BadEvent(format!("no {name} header")))
        };
        let id = header(headers::EVENT_ID)?;
        let event_type = header(headers::EVENT_TYPE)?;
        let version = header(headers::SCHEMA_VERSION)?;
        let schema_version = version
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                Error::BadEvent(format!("schema-version {version:?} is not 1 or more"))
            })?;
        let trace = record
            .trace_context()
            .unwrap_or_else(TraceContext::new_root);
        Ok(Event {
            id,
            event_type,
            schema_version,
            trace,
            record,
        })
    }

    /// The context of the handling of this event, the parent of what the handler
    /// publishes: the client's processing span when the handler runs inside it (as
    /// [`DeadLetters::process`](strata_client::DeadLetters::process) runs it), else the
    /// producer's context.
    pub fn context(&self) -> TraceContext {
        TraceContext::current().unwrap_or(self.trace)
    }

    /// Fails with [`Error::BadEvent`] unless this is an event of `event_type`.
    pub fn expect_type(&self, event_type: &str) -> Result<()> {
        if self.event_type == event_type {
            Ok(())
        } else {
            Err(Error::BadEvent(format!(
                "{} on {} is not a {event_type} event",
                self.event_type, self.record.topic
            )))
        }
    }

    /// Decodes the JSON payload as `T`, which may be an older version's struct: fields
    /// it does not know are ignored.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T> {
        let value = self.record.value.as_deref().unwrap_or_default();
        serde_json::from_slice(value).map_err(|e| {
            Error::BadEvent(format!(
                "{} version {} does not decode: {e}",
                self.event_type, self.schema_version
            ))
        })
    }
}

/// The JSON Schema of each type and version, as shipped in `schemas/`.
pub const SCHEMAS: [(&str, u32, &str); 5] = [
    (
        types::ORDER_CREATED,
        1,
        include_str!("../schemas/order.created.v1.json"),
    ),
    (
        types::ORDER_CREATED,
        2,
        include_str!("../schemas/order.created.v2.json"),
    ),
    (
        types::PAYMENT_COMPLETED,
        1,
        include_str!("../schemas/payment.completed.v1.json"),
    ),
    (
        types::PAYMENT_FAILED,
        1,
        include_str!("../schemas/payment.failed.v1.json"),
    ),
    (
        types::INVENTORY_RELEASED,
        1,
        include_str!("../schemas/inventory.released.v1.json"),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use strata_client::Record;

    fn v1() -> OrderCreatedV1 {
        OrderCreatedV1 {
            order_id: "o-1".into(),
            customer_id: "alice".into(),
            lines: vec![OrderLine {
                sku: "TEA-01".into(),
                quantity: 2,
                unit_price_cents: 450,
            }],
            total_cents: 900,
            payment_token: "tok_visa".into(),
            seq: seq::CREATED,
            created_at_ms: 1_767_225_600_000,
        }
    }

    fn v2() -> OrderCreatedV2 {
        OrderCreatedV2 {
            v1: v1(),
            currency: CURRENCY.into(),
            discount_cents: 0,
        }
    }

    fn consumed(record: Record) -> ConsumedRecord {
        ConsumedRecord {
            topic: topics::ORDERS_CREATED.into(),
            partition: 0,
            offset: 7,
            timestamp_ms: 0,
            key: record.key,
            value: record.value,
            headers: record.headers,
        }
    }

    fn record(version: &str, payload: &str) -> Record {
        Record::new(payload.to_string())
            .key("o-1")
            .header(headers::EVENT_ID, "e-1")
            .header(headers::EVENT_TYPE, types::ORDER_CREATED)
            .header(headers::SCHEMA_VERSION, version.to_string())
    }

    /// The compatibility promise: a reader built for version 1 decodes a version 2
    /// event, and sees the same values for the fields it knows.
    #[test]
    fn a_version_1_reader_decodes_version_2_events() {
        let payload = serde_json::to_string(&v2()).expect("encodes");
        let event = Event::parse(consumed(record("2", &payload))).expect("valid envelope");
        assert_eq!(event.schema_version, 2);
        let read: OrderCreatedV1 = event.payload().expect("v1 reads v2");
        assert_eq!(read, v1());
    }

    #[test]
    fn a_version_2_reader_does_not_decode_version_1_events() {
        // Readers of a later version must not require its new fields from old events;
        // this is why the payment service reads with the version 1 struct.
        let payload = serde_json::to_string(&v1()).expect("encodes");
        let event = Event::parse(consumed(record("1", &payload))).expect("valid envelope");
        assert!(event.payload::<OrderCreatedV2>().is_err());
        assert_eq!(
            event.payload::<OrderCreatedV1>().expect("v1 reads v1"),
            v1()
        );
    }

    #[test]
    fn an_envelope_without_its_headers_is_a_bad_event() {
        let no_id = Record::new("{}").header(headers::EVENT_TYPE, types::ORDER_CREATED);
        assert!(matches!(
            Event::parse(consumed(no_id)),
            Err(Error::BadEvent(m)) if m.contains("event-id")
        ));
        for version in ["0", "x", "-1", ""] {
            assert!(Event::parse(consumed(record(version, "{}"))).is_err());
        }
        let event = Event::parse(consumed(record("1", "not json"))).expect("valid envelope");
        assert!(matches!(
            event.payload::<OrderCreatedV1>(),
            Err(Error::BadEvent(_))
        ));
        assert!(event.expect_type(types::PAYMENT_FAILED).is_err());
        assert!(event.expect_type(types::ORDER_CREATED).is_ok());
    }

    /// The schemas in `schemas/` describe what the code writes: every field of an
    /// example payload is a declared property of the right JSON type, every required
    /// property is present, and a later version of a type keeps every property and
    /// every requirement of the earlier one (the versioning rule).
    #[test]
    fn the_shipped_schemas_match_the_payloads() {
        let examples: Vec<(&str, u32, Value)> = vec![
            (types::ORDER_CREATED, 1, json(&v1())),
            (types::ORDER_CREATED, 2, json(&v2())),
            (
                types::PAYMENT_COMPLETED,
                1,
                json(&PaymentCompleted {
                    order_id: "o-1".into(),
                    payment_id: "p-1".into(),
                    customer_id: "alice".into(),
                    amount_cents: 900,
                    seq: seq::PAYMENT,
                    occurred_at_ms: 1,
                }),
            ),
            (
                types::PAYMENT_FAILED,
                1,
                json(&PaymentFailed {
                    order_id: "o-1".into(),
                    payment_id: "p-1".into(),
                    customer_id: "alice".into(),
                    amount_cents: 900,
                    reason: "card declined".into(),
                    seq: seq::PAYMENT,
                    occurred_at_ms: 1,
                }),
            ),
            (
                types::INVENTORY_RELEASED,
                1,
                json(&InventoryReleased {
                    order_id: "o-1".into(),
                    lines: vec![StockLine {
                        sku: "TEA-01".into(),
                        quantity: 2,
                    }],
                    seq: seq::RELEASED,
                    occurred_at_ms: 1,
                }),
            ),
        ];
        for (event_type, version, example) in examples {
            let schema = schema(event_type, version);
            assert_eq!(schema["x-event-type"], event_type);
            assert_eq!(schema["x-schema-version"], version);
            conforms(&schema, &example, &format!("{event_type} v{version}"));
        }
        let (old, new) = (
            schema(types::ORDER_CREATED, 1),
            schema(types::ORDER_CREATED, 2),
        );
        for (name, property) in old["properties"].as_object().expect("properties") {
            assert_eq!(&new["properties"][name], property, "v2 keeps {name}");
        }
        for required in old["required"].as_array().expect("required") {
            assert!(new["required"]
                .as_array()
                .expect("required")
                .contains(required));
        }
    }

    fn json<T: Serialize>(value: &T) -> Value {
        serde_json::to_value(value).expect("encodes")
    }

    fn schema(event_type: &str, version: u32) -> Value {
        let (_, _, text) = SCHEMAS
            .iter()
            .find(|(t, v, _)| *t == event_type && *v == version)
            .expect("a schema for every type and version");
        serde_json::from_str(text).expect("a schema is JSON")
    }

    /// The subset of JSON Schema the shipped schemas use: `type`, `properties`,
    /// `required`, `items`.
    fn conforms(schema: &Value, value: &Value, path: &str) {
        let kind = schema["type"]
            .as_str()
            .expect("every schema node has a type");
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64(),
            other => panic!("{path}: type {other} is not used by the schemas"),
        };
        assert!(ok, "{path}: {value} is not {kind}");
        if let Some(object) = value.as_object() {
            let properties = schema["properties"].as_object().expect("properties");
            for (name, field) in object {
                let property = properties
                    .get(name)
                    .unwrap_or_else(|| panic!("{path}.{name} is not in the schema"));
                conforms(property, field, &format!("{path}.{name}"));
            }
            for required in schema["required"].as_array().expect("required") {
                let name = required.as_str().expect("a name");
                assert!(object.contains_key(name), "{path}: {name} is missing");
            }
        }
        if let Some(items) = value.as_array() {
            for (i, item) in items.iter().enumerate() {
                conforms(&schema["items"], item, &format!("{path}[{i}]"));
            }
        }
    }
}
