//! The pipeline's run-time controls over the admin API: resize the zone writers and the sink
//! workers, change the rate limit, and see the topology, without a restart.
//!
//! `GET /api/pipeline` shows the stages, their concurrency and load, and the rate limit.
//! `POST /api/pipeline/processors {"concurrency": N}`, `POST /api/pipeline/batchers/:name
//! {"concurrency": N}` and `POST /api/pipeline/rate_limit {"allowed": N, "interval_ms": M}`
//! change it and answer with the same view. A change the engine refuses is `422` (zero, or the
//! broadcast batcher off one worker), an unknown batcher `404`, a server shutting down `503`;
//! `/metrics` shows the new values (`thunderline_pipeline_concurrency`,
//! `thunderline_pipeline_rate_limit_allowed`, `..._interval_seconds`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::api::{ApiError, ApiJson, ApiState};
use crate::pipeline::{ConfigError, Pipeline, Topology};
use crate::runtime::ZoneWork;

/// The daemon's zone pipeline, shared by the server (which drains it) and the admin API.
pub type ZonePipeline = Arc<Pipeline<ZoneWork>>;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/pipeline", get(show))
        .route("/api/pipeline/processors", post(resize_processors))
        .route("/api/pipeline/batchers/{name}", post(resize_batcher))
        .route("/api/pipeline/rate_limit", post(set_rate_limit))
}

#[derive(Serialize)]
struct PipelineView {
    topology: Topology,
    /// None when there is no limit.
    rate_limit: Option<RateLimitView>,
}

#[derive(Serialize)]
struct RateLimitView {
    allowed: usize,
    interval_ms: u128,
}

fn view(pipeline: &ZonePipeline) -> Json<PipelineView> {
    Json(PipelineView {
        topology: pipeline.topology(),
        rate_limit: pipeline
            .rate_limit()
            .map(|(allowed, interval)| RateLimitView {
                allowed,
                interval_ms: interval.as_millis(),
            }),
    })
}

async fn show(State(state): State<ApiState>) -> Json<PipelineView> {
    view(&state.pipeline)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Concurrency {
    concurrency: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimit {
    allowed: usize,
    interval_ms: u64,
}

fn refused(e: ConfigError) -> ApiError {
    let (status, error) = match &e {
        ConfigError::UnknownBatcher(_) => (StatusCode::NOT_FOUND, "batcher_not_found"),
        ConfigError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        _ => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
    };
    ApiError::new(status, error, e.to_string())
}

/// Applies one change and answers with the pipeline as it is now.
fn change(
    state: &ApiState,
    apply: impl FnOnce(&Pipeline<ZoneWork>) -> Result<(), ConfigError>,
) -> Result<Json<PipelineView>, ApiError> {
    apply(&state.pipeline).map_err(refused)?;
    Ok(view(&state.pipeline))
}

async fn resize_processors(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<Concurrency>,
) -> Result<Json<PipelineView>, ApiError> {
    change(&state, |p| p.resize_processors(req.concurrency))
}

async fn resize_batcher(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<Concurrency>,
) -> Result<Json<PipelineView>, ApiError> {
    // The broadcast batcher's single worker is what keeps each zone's events in seq order on
    // the sockets (the pipeline file refuses anything else for the same reason).
    if name == "broadcast" && req.concurrency != 1 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "refused",
            "batcher \"broadcast\" runs exactly one sink worker: each zone's subscribers see its \
             events in seq order, which one worker keeps",
        ));
    }
    change(&state, |p| p.resize_batcher(&name, req.concurrency))
}

async fn set_rate_limit(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<RateLimit>,
) -> Result<Json<PipelineView>, ApiError> {
    let interval = Duration::from_millis(req.interval_ms);
    change(&state, |p| p.set_rate_limit(req.allowed, interval))
}
