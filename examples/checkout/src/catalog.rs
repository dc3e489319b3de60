//! The checkout's business rules: who may order (auth), what things cost (catalog), what
//! discount applies — shared by both designs, so they differ only in how the work is
//! wired together. The synchronous baseline puts each rule behind its own HTTP service;
//! the event-driven order service applies them in-process (the validation it does
//! before answering).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::OrderLine;

/// A product for sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// Its stock-keeping unit, the id orders use.
    pub sku: &'static str,
    /// For people.
    pub name: &'static str,
    /// The price of one, in cents.
    pub price_cents: i64,
}

/// Everything the shop sells.
pub const PRODUCTS: [Product; 8] = [
    Product {
        sku: "TEA-01",
        name: "Green tea, 100 g",
        price_cents: 450,
    },
    Product {
        sku: "TEA-02",
        name: "Black tea, 100 g",
        price_cents: 390,
    },
    Product {
        sku: "MUG-01",
        name: "Stoneware mug",
        price_cents: 1200,
    },
    Product {
        sku: "POT-01",
        name: "Cast-iron teapot",
        price_cents: 4900,
    },
    Product {
        sku: "KET-01",
        name: "Gooseneck kettle",
        price_cents: 6900,
    },
    Product {
        sku: "SCL-01",
        name: "Kitchen scale",
        price_cents: 2500,
    },
    Product {
        sku: "FLT-01",
        name: "Paper filters, 100",
        price_cents: 350,
    },
    Product {
        sku: "TIN-01",
        name: "Storage tin",
        price_cents: 800,
    },
];

/// Lines per order at most.
pub const LINES_MAX: usize = 20;
/// Units of one product per order at most.
pub const QUANTITY_MAX: i64 = 100;
/// Length of a customer id at most.
pub const CUSTOMER_ID_BYTES_MAX: usize = 64;
/// Length of a payment token at most.
pub const PAYMENT_TOKEN_BYTES_MAX: usize = 64;
/// The payment token used when a checkout names none.
pub const DEFAULT_PAYMENT_TOKEN: &str = "tok_visa";
/// Orders from this subtotal get [`DISCOUNT_PERCENT`] off.
pub const DISCOUNT_FROM_CENTS: i64 = 10_000;
/// The discount above [`DISCOUNT_FROM_CENTS`].
pub const DISCOUNT_PERCENT: i64 = 10;

/// The body of `POST /checkout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutRequest {
    /// Who orders.
    pub customer_id: String,
    /// What, by product and quantity.
    pub items: Vec<ItemRequest>,
    /// How to pay; [`DEFAULT_PAYMENT_TOKEN`] if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_token: Option<String>,
}

impl CheckoutRequest {
    /// A checkout of `items` (product, quantity) by `customer_id`, paid with
    /// [`DEFAULT_PAYMENT_TOKEN`].
    pub fn new(customer_id: impl Into<String>, items: &[(&str, i64)]) -> CheckoutRequest {
        CheckoutRequest {
            customer_id: customer_id.into(),
            items: items
                .iter()
                .map(|&(sku, quantity)| ItemRequest {
                    sku: sku.to_string(),
                    quantity,
                })
                .collect(),
            payment_token: None,
        }
    }
}

/// One line of a [`CheckoutRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRequest {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: i64,
}

/// A checkout that passed every rule, priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedOrder {
    /// Who orders.
    pub customer_id: String,
    /// The lines, in request order.
    pub lines: Vec<OrderLine>,
    /// Sum of the lines.
    pub subtotal_cents: i64,
    /// Taken off the subtotal.
    pub discount_cents: i64,
    /// What to charge.
    pub total_cents: i64,
    /// How to pay.
    pub payment_token: String,
}

/// The product with this SKU.
pub fn product(sku: &str) -> Option<&'static Product> {
    PRODUCTS.iter().find(|p| p.sku == sku)
}

/// Auth: a customer id is 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn authenticate(customer_id: &str) -> Result<()> {
    let valid = !customer_id.is_empty()
        && customer_id.len() <= CUSTOMER_ID_BYTES_MAX
        && customer_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "customer_id {customer_id:?} must be 1 to {CUSTOMER_ID_BYTES_MAX} letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Catalog: prices each line; 1 to [`LINES_MAX`] lines of known, distinct products,
/// each 1 to [`QUANTITY_MAX`] units.
pub fn price(items: &[ItemRequest]) -> Result<Vec<OrderLine>> {
    if items.is_empty() || items.len() > LINES_MAX {
        return Err(Error::Invalid(format!(
            "an order has 1 to {LINES_MAX} items, not {}",
            items.len()
        )));
    }
    let mut lines: Vec<OrderLine> = Vec::with_capacity(items.len());
    for item in items {
        if !(1..=QUANTITY_MAX).contains(&item.quantity) {
            return Err(Error::Invalid(format!(
                "quantity of {} is {}; it must be 1 to {QUANTITY_MAX}",
                item.sku, item.quantity
            )));
        }
        let product = product(&item.sku)
            .ok_or_else(|| Error::Unprocessable(format!("unknown product {:?}", item.sku)))?;
        if lines.iter().any(|l| l.sku == item.sku) {
            return Err(Error::Invalid(format!(
                "{} appears twice; give each product once with its quantity",
                item.sku
            )));
        }
        lines.push(OrderLine {
            sku: product.sku.to_string(),
            quantity: item.quantity,
            unit_price_cents: product.price_cents,
        });
    }
    Ok(lines)
}

/// Discount: [`DISCOUNT_PERCENT`] off a subtotal of [`DISCOUNT_FROM_CENTS`] or more,
/// rounded down to the cent.
pub fn discount(subtotal_cents: i64) -> i64 {
    if subtotal_cents >= DISCOUNT_FROM_CENTS {
        subtotal_cents * DISCOUNT_PERCENT / 100
    } else {
        0
    }
}

/// Applies every rule: auth, catalog, discount.
pub fn validate(request: &CheckoutRequest) -> Result<PricedOrder> {
    authenticate(&request.customer_id)?;
    let lines = price(&request.items)?;
    let payment_token = request
        .payment_token
        .clone()
        .unwrap_or_else(|| DEFAULT_PAYMENT_TOKEN.to_string());
    if payment_token.is_empty() || payment_token.len() > PAYMENT_TOKEN_BYTES_MAX {
        return Err(Error::Invalid(format!(
            "payment_token must be 1 to {PAYMENT_TOKEN_BYTES_MAX} bytes"
        )));
    }
    let subtotal_cents = subtotal(&lines);
    let discount_cents = discount(subtotal_cents);
    Ok(PricedOrder {
        customer_id: request.customer_id.clone(),
        lines,
        subtotal_cents,
        discount_cents,
        total_cents: subtotal_cents - discount_cents,
        payment_token,
    })
}

/// The sum of the lines, in cents.
pub fn subtotal(lines: &[OrderLine]) -> i64 {
    lines.iter().map(|l| l.quantity * l.unit_price_cents).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(items: &[(&str, i64)]) -> CheckoutRequest {
        CheckoutRequest::new("alice", items)
    }

    #[test]
    fn prices_and_discounts_an_order() {
        let order = validate(&request(&[("TEA-01", 2), ("MUG-01", 1)])).expect("valid");
        assert_eq!(order.subtotal_cents, 2 * 450 + 1200);
        assert_eq!(order.discount_cents, 0);
        assert_eq!(order.total_cents, 2100);
        assert_eq!(order.payment_token, DEFAULT_PAYMENT_TOKEN);
        let big = validate(&request(&[("KET-01", 2)])).expect("valid");
        assert_eq!(big.discount_cents, 1380);
        assert_eq!(big.total_cents, 13_800 - 1380);
    }

    #[test]
    fn rejects_what_breaks_a_rule() {
        let check = |request: CheckoutRequest, status: u16| {
            let error = validate(&request).expect_err("rejected");
            assert_eq!(error.status().as_u16(), status, "{error}");
        };
        check(request(&[]), 400);
        check(request(&[("TEA-01", 0)]), 400);
        check(request(&[("TEA-01", QUANTITY_MAX + 1)]), 400);
        check(request(&[("NOPE", 1)]), 422);
        check(request(&[("TEA-01", 1), ("TEA-01", 2)]), 400);
        check(
            CheckoutRequest {
                customer_id: "bad id".into(),
                ..request(&[("TEA-01", 1)])
            },
            400,
        );
        check(
            CheckoutRequest {
                payment_token: Some(String::new()),
                ..request(&[("TEA-01", 1)])
            },
            400,
        );
        let many: Vec<(&str, i64)> = PRODUCTS.iter().map(|p| (p.sku, 1)).collect();
        assert!(validate(&request(&many)).is_ok());
    }
}
