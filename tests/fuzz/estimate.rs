//! Target `estimate`: the measure of a body (`estimate_input`) and the
//! learner that turns it into a reservation (`InputModel`).
//!
//! The invariants are the ones the code documents: measuring never panics
//! and is deterministic; at the prior rates the estimate is never below the
//! floor (every counted byte is worth more than 1/16 of a token there), and
//! for ASCII text not even at the lowest rates learning can reach (a
//! quarter of each prior); a breakpoint measures a prefix, so it never
//! holds more than the whole body; appending a message never lowers the
//! estimate or the floor (each text is measured on its own, so a new one
//! only adds). Appending *characters* to one text may lower it, by design:
//! a run that grows to 32 characters becomes base64. Learning, from any
//! sequence of answers however absurd, keeps every rate finite within
//! [prior/4, prior×4] and every margin within [1, 1.5], and reserves at
//! least the point estimate.

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::{json, Map, Value};
use spillway_core::estimate::{Feature, InputEstimate};
use spillway_core::learn::{InputModel, Quantile, MAX_MARGIN};
use spillway_core::{estimate_input, ContentClass, ImageRule, Rates};

use crate::harness::{self, ensure, Fuzz};
use crate::inputs::{arb_json, mutated, valid_request};

const TARGET: &str = "estimate";

fn measure(body: &Map<String, Value>) -> InputEstimate {
    estimate_input(body, ImageRule::default())
}

fn all_ascii(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_ascii(),
        Value::Array(items) => items.iter().all(all_ascii),
        Value::Object(map) => map.values().all(all_ascii),
        _ => true,
    }
}

fn measured(body: &Map<String, Value>) -> TestCaseResult {
    let e = measure(body);
    ensure(measure(body) == e, || "measuring twice differs".into())?;
    let prior = Rates::prior(3.5);
    ensure(e.floor() <= e.tokens(&prior), || {
        format!(
            "floor {} over the prior estimate {}",
            e.floor(),
            e.tokens(&prior)
        )
    })?;
    if all_ascii(&Value::Object(body.clone())) {
        let lowest = Rates(prior.0.map(|r| r / 4.0));
        ensure(e.floor() <= e.tokens(&lowest), || {
            format!(
                "ASCII floor {} over the lowest estimate {}",
                e.floor(),
                e.tokens(&lowest)
            )
        })?;
    }
    ensure(e.json_chars <= e.text_chars, || format!("{e:?}"))?;
    ensure(e.features.get(Feature::Request) == 1, || format!("{e:?}"))?;
    let mut previous = [0u64; 12];
    for bp in e.breakpoints() {
        for (i, (&part, &whole)) in bp.features.0.iter().zip(&e.features.0).enumerate() {
            ensure(part <= whole && part >= previous[i], || {
                format!("breakpoint features out of prefix order: {e:?}")
            })?;
        }
        previous = bp.features.0;
    }
    for class_rates in [prior, Rates::prior(1.0), Rates::prior(f64::NAN)] {
        let _ = e.class(&class_rates);
    }
    let model = InputModel::new(prior, Quantile::default());
    let reserve = model.reserve(&e);
    ensure(
        reserve.point == e.tokens(&prior) && reserve.reserved >= reserve.point,
        || format!("{reserve:?}"),
    )?;

    // One more message only adds.
    let mut longer = body.clone();
    let extra = json!({"role": "user", "content": "one more turn"});
    match longer.get_mut("messages") {
        Some(Value::Array(m)) => m.push(extra),
        _ => {
            longer.insert("messages".into(), json!([extra]));
        }
    }
    let after = measure(&longer);
    for (f, (&a, &b)) in Feature::ALL
        .iter()
        .zip(after.features.0.iter().zip(&e.features.0))
    {
        ensure(a >= b, || {
            format!("appending a message lowered {}: {b} → {a}", f.name())
        })?;
    }
    ensure(
        after.tokens(&prior) >= e.tokens(&prior) && after.floor() >= e.floor(),
        || "appending a message lowered the estimate".into(),
    )
}

fn body_bytes(bytes: &[u8]) -> TestCaseResult {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(body)) => measured(&body),
        Ok(other) => {
            // Any value anywhere a body holds something.
            let wrapped = json!({"system": other, "tools": [other], "messages": [other, {"content": [other]}]});
            measured(wrapped.as_object().expect("an object"))
        }
        Err(_) => Ok(()),
    }
}

fn within_bounds(model: &InputModel, prior: &Rates) -> TestCaseResult {
    for f in Feature::ALL {
        let (r, p) = (model.rates().get(f), prior.get(f));
        ensure(
            r.is_finite() && r >= p / 4.0 - 1e-9 && r <= p * 4.0 + 1e-9,
            || format!("rate of {} is {r}, prior {p}", f.name()),
        )?;
    }
    for class in ContentClass::ALL {
        let m = model.margin(class);
        ensure((1.0..=MAX_MARGIN).contains(&m), || {
            format!("margin {m} for {}", class.name())
        })?;
    }
    Ok(())
}

/// A sequence of answers: (body, actual input tokens).
fn learning(answers: &[(Value, u64)]) -> TestCaseResult {
    let prior = Rates::prior(3.5);
    let mut model = InputModel::new(prior, Quantile::default());
    let mut twin = InputModel::new(prior, Quantile::default());
    for (body, actual) in answers {
        let Some(body) = body.as_object() else {
            continue;
        };
        let e = measure(body);
        let ratio = model.observe(&e, *actual);
        ensure(ratio.is_none_or(|r| r.is_finite() && r > 0.0), || {
            format!("ratio {ratio:?}")
        })?;
        twin.observe(&e, *actual);
        within_bounds(&model, &prior)?;
        let reserve = model.reserve(&e);
        ensure(reserve.reserved >= reserve.point, || format!("{reserve:?}"))?;
    }
    ensure(model.rates() == twin.rates(), || {
        "learning is not deterministic".into()
    })
}

fn encode_learning(answers: &Vec<(Value, u64)>) -> Vec<u8> {
    serde_json::to_vec_pretty(answers).expect("JSON serializes")
}

fn check_stored(kind: &str, bytes: &[u8]) -> TestCaseResult {
    match kind {
        "learn" => {
            let answers: Vec<(Value, u64)> = serde_json::from_slice(bytes)
                .map_err(|e| TestCaseError::fail(format!("not a learn case: {e}")))?;
            learning(&answers)
        }
        _ => body_bytes(bytes),
    }
}

/// Why monotonicity is promised per message and not per character: a run
/// of base64's alphabet that reaches 32 characters with a letter and a
/// digit in it is re-counted as base64, which can cost less than the
/// punctuation it was counted as.
#[test]
fn appending_characters_may_lower_the_estimate_by_design() {
    let at = |text: &str| {
        let body = json!({"messages": [{"role": "user", "content": text}]});
        measure(body.as_object().expect("an object")).tokens(&Rates::prior(3.5))
    };
    let short = format!("a{}1", "-".repeat(29));
    let longer = format!("{short}-");
    assert!(
        at(&longer) < at(&short),
        "{} vs {}",
        at(&longer),
        at(&short)
    );
}

#[test]
fn corpus() {
    harness::replay(TARGET, check_stored);
}

#[test]
fn fuzz() {
    let seeds = harness::seeds(TARGET, &["body"]);
    let actual = prop_oneof![0u64..10, 1u64..1_000_000, Just(u64::MAX), any::<u64>()];
    let answers = prop::collection::vec((valid_request(), actual), 1..24);
    Fuzz::new(TARGET)
        .property(
            "body",
            "json",
            valid_request(),
            |v| serde_json::to_vec(v).expect("JSON serializes"),
            |v| measured(v.as_object().expect("an object")),
        )
        .property(
            "body",
            "json",
            arb_json(),
            |v| serde_json::to_vec(v).expect("JSON serializes"),
            |v| body_bytes(&serde_json::to_vec(&v).expect("JSON serializes")),
        )
        .property(
            "body",
            "json",
            mutated(
                seeds,
                valid_request().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
            ),
            Vec::clone,
            |b| body_bytes(&b),
        )
        .property("learn", "json", answers, encode_learning, |a| learning(&a))
        .run();
}
