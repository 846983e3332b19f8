//! The live console at `/`: a page compiled into the binary (its script, its styles and the
//! official `phoenix` client, nothing fetched from elsewhere) that shows the pipeline's stages,
//! the broker sources and the zones. It reads figures from the socket's `admin:console` topic
//! (a [`ConsoleFeed`] of the server's metrics) and everything else from the admin API, both
//! with the admin token, which the page asks for before it shows anything.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::Registry;
use prometheus::proto::MetricType;
use serde_json::{Map, Value, json};

use crate::realtime::ConsoleFeed;

const INDEX: &str = include_str!("assets/index.html");
const APP: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
/// The official client, as its npm package ships it (1.8.16, MIT: assets/phoenix-LICENSE.md).
const PHOENIX: &str = include_str!("assets/phoenix.mjs");

/// The page and its assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let asset = |body: &'static str, kind: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response()
        })
    };
    Router::new()
        .route("/", asset(INDEX, "text/html; charset=utf-8"))
        .route(
            "/console/app.js",
            asset(APP, "text/javascript; charset=utf-8"),
        )
        .route("/console/app.css", asset(STYLE, "text/css; charset=utf-8"))
        .route(
            "/console/phoenix.mjs",
            asset(PHOENIX, "text/javascript; charset=utf-8"),
        )
}

/// Metric families the console shows.
const SHOWN: [&str; 4] = [
    "thunderline_pipeline_",
    "thunderline_source_",
    "thunderline_socket_connections",
    "thunderline_zone_rejoins_total",
];

/// The console topic's feed: the shown metrics of `registry`, every half second.
pub fn feed(admin_token: String, registry: Registry) -> ConsoleFeed {
    ConsoleFeed {
        admin_token,
        stats: Arc::new(move || stats(&registry)),
        every: Duration::from_millis(500),
    }
}

/// `{"at": <unix ms>, "samples": [[name, {label: value}, value], …]}`; a histogram gives its
/// `_count` and `_sum`.
fn stats(registry: &Registry) -> Value {
    let mut samples = Vec::new();
    for family in registry.gather() {
        let name = family.name();
        if !SHOWN.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        for metric in family.get_metric() {
            let labels: Map<String, Value> = metric
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), Value::from(l.value())))
                .collect();
            let mut push = |suffix: &str, value: f64| {
                samples.push(json!([format!("{name}{suffix}"), labels.clone(), value]));
            };
            match family.get_field_type() {
                MetricType::COUNTER => push("", metric.get_counter().get_value()),
                MetricType::GAUGE => push("", metric.get_gauge().get_value()),
                MetricType::HISTOGRAM => {
                    let h = metric.get_histogram();
                    push("_count", h.get_sample_count() as f64);
                    push("_sum", h.get_sample_sum());
                }
                _ => {}
            }
        }
    }
    json!({"at": chrono::Utc::now().timestamp_millis(), "samples": samples})
}
