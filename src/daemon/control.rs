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
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{ApiError, ApiJson, ApiState};
use crate::pipeline::{ConfigError, Pipeline, Topology};
use crate::runtime::ZoneWork;

/// The daemon's zone pipeline, shared by the server (which drains it) and the admin API.
pub type ZonePipeline = Arc<Pipeline<ZoneWork>>;

/// The most workers a stage can be given here: each is a task (or, for the processors, a lane
/// of zones), and a number from a request must not be able to exhaust the process.
pub const MAX_CONCURRENCY: usize = 256;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(show))
        .routes(routes!(resize_processors))
        .routes(routes!(resize_batcher))
        .routes(routes!(set_rate_limit))
}

#[derive(Serialize, ToSchema)]
struct PipelineView {
    /// The stages: the producer, the processors and each batcher with their concurrency and
    /// load.
    #[schema(value_type = Object)]
    topology: Topology,
    /// None when there is no limit.
    rate_limit: Option<RateLimitView>,
}

#[derive(Serialize, ToSchema)]
struct RateLimitView {
    allowed: usize,
    #[schema(value_type = u64)]
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

#[utoipa::path(get, path = "/api/pipeline", tag = "pipeline",
    responses((status = 200, description = "The stages, their concurrency and load, and the rate limit", body = PipelineView)))]
async fn show(State(state): State<ApiState>) -> Json<PipelineView> {
    view(&state.pipeline)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Concurrency {
    /// 1 to 256 workers.
    #[schema(minimum = 1, maximum = 256)]
    concurrency: usize,
}

impl Concurrency {
    /// The workers asked for, within what a request may ask.
    fn checked(&self) -> Result<usize, ApiError> {
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refused",
                format!(
                    "concurrency must be between 1 and {MAX_CONCURRENCY}, not {}",
                    self.concurrency
                ),
            ));
        }
        Ok(self.concurrency)
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RateLimit {
    /// Messages let through per interval.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    allowed: u64,
    /// The interval, in milliseconds (at most a day).
    #[schema(minimum = 1, maximum = 86_400_000)]
    interval_ms: u64,
}

/// The bounds [`RateLimit`] describes: past them a limit means nothing a pipeline could use.
const MAX_ALLOWED: u64 = 1_000_000_000;
const MAX_INTERVAL_MS: u64 = 86_400_000;

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

/// Resizes the zone writers.
#[utoipa::path(post, path = "/api/pipeline/processors", tag = "pipeline", request_body = Concurrency,
    responses((status = 200, description = "The pipeline, resized", body = PipelineView)))]
async fn resize_processors(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<Concurrency>,
) -> Result<Json<PipelineView>, ApiError> {
    let concurrency = req.checked()?;
    change(&state, |p| p.resize_processors(concurrency))
}

/// Resizes one batcher's sink workers.
#[utoipa::path(post, path = "/api/pipeline/batchers/{name}", tag = "pipeline",
    params(("name" = String, Path, description = "The batcher's name (`audit`, `broadcast`…)", example = "broadcast")),
    request_body = Concurrency,
    responses((status = 200, description = "The pipeline, resized", body = PipelineView)))]
async fn resize_batcher(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<Concurrency>,
) -> Result<Json<PipelineView>, ApiError> {
    let concurrency = req.checked()?;
    // The broadcast batcher's single worker is what keeps each zone's events in seq order on
    // the sockets (the pipeline file refuses anything else for the same reason).
    if name == "broadcast" && concurrency != 1 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "refused",
            "batcher \"broadcast\" runs exactly one sink worker: each zone's subscribers see its \
             events in seq order, which one worker keeps",
        ));
    }
    change(&state, |p| p.resize_batcher(&name, concurrency))
}

/// Sets the producer's rate limit.
#[utoipa::path(post, path = "/api/pipeline/rate_limit", tag = "pipeline", request_body = RateLimit,
    responses((status = 200, description = "The pipeline with its new rate limit", body = PipelineView)))]
async fn set_rate_limit(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<RateLimit>,
) -> Result<Json<PipelineView>, ApiError> {
    if !(1..=MAX_ALLOWED).contains(&req.allowed)
        || !(1..=MAX_INTERVAL_MS).contains(&req.interval_ms)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "refused",
            format!("allowed must be 1 to {MAX_ALLOWED} and interval_ms 1 to {MAX_INTERVAL_MS}"),
        ));
    }
    let interval = Duration::from_millis(req.interval_ms);
    change(&state, |p| p.set_rate_limit(req.allowed as usize, interval))
}
