//! HTTP: the WebSocket endpoint, the admin API (bearer-token protected), health and metrics.
//!
//! Every error is JSON `{"error", "details"}` with a status that says whose fault it was: 400
//! bad input, 401 no or wrong admin token, 404 no such zone (or batcher), 409 conflict, 422 a refused
//! operation, 503 not ready.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::realtime::revocation::Revocation;
use crate::realtime::{Hub, SocketContext, TokenSigner, socket};
use crate::runtime::{AskError, ZoneHandle};
use crate::runtime::{ZoneWork, command};
use crate::store::{DeadLetter, StoreError};
use crate::zone::{
    Accepted, Actor, Answer, CommandKind, NewZone, Outcome, Permissions, Zone, ZoneError,
    ZonePatch, ZoneState, ZoneView, parse_zone_id,
};

use super::control::{self, ZonePipeline};

#[derive(Clone)]
pub struct ApiState {
    pub zones: ZoneHandle,
    pub hub: Arc<Hub>,
    pub signer: TokenSigner,
    pub admin_token: Arc<str>,
    pub sockets: Arc<SocketContext<ZoneWork>>,
    pub registry: Registry,
    pub server_name: String,
    pub pipeline: ZonePipeline,
    /// The longest a minted join token may live, in seconds.
    pub max_token_ttl: u64,
    /// The bearer token `/metrics` asks for, if any.
    pub metrics_token: Option<Arc<str>>,
    /// In a cluster: who writes which zone.
    pub cluster: Option<Arc<crate::cluster::Router>>,
    /// What moves agents between zones.
    pub migrations: Arc<crate::runtime::Migrations>,
}

/// An API error: status, a short machine-readable name, and details for a person.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    details: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: &'static str, details: impl Into<String>) -> Self {
        Self {
            status,
            error,
            details: details.into(),
        }
    }

    fn bad_request(details: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", details)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.error, "details": self.details})),
        )
            .into_response()
    }
}

impl From<ZoneError> for ApiError {
    fn from(e: ZoneError) -> Self {
        let (status, error) = match &e {
            ZoneError::ZoneNotFound(_) => (StatusCode::NOT_FOUND, "zone_not_found"),
            ZoneError::MalformedId(_) => (StatusCode::BAD_REQUEST, "malformed_id"),
            ZoneError::UnknownPermission(_) => (StatusCode::BAD_REQUEST, "unknown_permission"),
            ZoneError::InvalidZone(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_zone"),
            ZoneError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ZoneError::Forbidden { .. } | ZoneError::NotAllowed { .. } => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            ZoneError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ZoneError::ZoneFull { .. }
            | ZoneError::NotInZone { .. }
            | ZoneError::MigrationPending => (StatusCode::CONFLICT, e.reason()),
            ZoneError::SameZone | ZoneError::InvalidTicket(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, e.reason())
            }
            ZoneError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ZoneError::InvalidPayload { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_payload")
            }
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
        };
        Self::new(status, error, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Zone(z) => z.into(),
            other => {
                tracing::error!(error = %other, "store error in the admin API");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    other.to_string(),
                )
            }
        }
    }
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        let error = match e {
            AskError::Overloaded => "overloaded",
            AskError::ShuttingDown => "shutting_down",
            AskError::NoAnswer => "no_answer",
        };
        Self::new(StatusCode::SERVICE_UNAVAILABLE, error, e.to_string())
    }
}

/// `Json` whose rejections are our JSON errors.
pub struct ApiJson<T>(pub T);

/// The largest admin API request body: room for a zone's properties at their own limit (64 KiB)
/// with the rest of the zone around them, and no more.
pub const ADMIN_BODY_LIMIT: usize = 128 * 1024;

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| {
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON, with `Content-Type: application/json`",
            ));
        }
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is over the admin API's limit of {ADMIN_BODY_LIMIT} bytes"),
                ),
                _ => ApiError::bad_request(e.body_text()),
            })?;
        // Every body the API takes is an object: serde would also read a struct from an array
        // of its fields in order (`[]` as an empty patch), which no one means.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        Json::<T>::from_bytes(&body)
            .map(|Json(v)| Self(v))
            .map_err(|e| {
                // A permission the body names that does not exist keeps its own code, as when
                // it came through a query or the command line.
                if e.body_text().contains("unknown permission") {
                    ApiError::new(StatusCode::BAD_REQUEST, "unknown_permission", e.body_text())
                } else {
                    ApiError::bad_request(e.body_text())
                }
            })
    }
}

/// The admin routes, each registered with its description ([`super::openapi`]): one list for
/// both, so that the router and `GET /api/openapi.json` cannot differ.
pub(super) fn admin_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_zone, list_zones))
        .routes(routes!(get_zone, patch_zone, delete_zone))
        .routes(routes!(change_permissions))
        .routes(routes!(zone_events))
        .routes(routes!(broadcast))
        .routes(routes!(zone_agents))
        .routes(routes!(migrate_agent))
        .routes(routes!(dead_letters))
        .routes(routes!(cluster_view))
        .routes(routes!(drain_node))
        .routes(routes!(mint_token))
        .routes(routes!(revoke_tokens))
        .merge(control::routes())
}

/// The described routes that need no token: the description itself and the health checks.
pub(super) fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(super::openapi::openapi_json))
        .routes(routes!(healthz))
        .routes(routes!(ready))
}

/// The server's routes; `/metrics` among them unless it is served elsewhere
/// ([`metrics_router`] on `serve --metrics-listen`).
pub fn router(state: ApiState, with_metrics: bool) -> Router {
    let (admin, _) = admin_routes().split_for_parts();
    let admin = admin
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let (described, _) = public_routes().split_for_parts();
    let public = Router::new()
        .merge(admin)
        .merge(described)
        .route("/socket/websocket", get(websocket))
        .merge(super::console::routes());
    let public = if with_metrics {
        public.route("/metrics", get(metrics))
    } else {
        public
    };
    public
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`, or `ready`.
    status: String,
}

/// Whether the process answers at all.
#[utoipa::path(get, path = "/healthz", tag = "server",
    responses((status = 200, description = "The server answers", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// What no route serves: answered as every other error, `{"error", "details"}`.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("nothing is served at {method} {}", uri.path()),
    )
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

/// `/metrics` alone, for its own address.
pub fn metrics_router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

use crate::realtime::token::same;

async fn require_admin(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if same(token.trim().as_bytes(), state.admin_token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin token is wrong",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer <token>`",
        )
        .into_response(),
    }
}

#[derive(Deserialize)]
struct SocketQuery {
    vsn: Option<String>,
}

/// Whether an upgrade's `Sec-WebSocket-Key` is what RFC 6455 §4.2.1 requires: the base64 of
/// 16 bytes (24 characters, padded).
fn valid_websocket_key(headers: &HeaderMap) -> bool {
    use base64::Engine;
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|key| {
            base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .ok()
        })
        .is_some_and(|nonce| nonce.len() == 16)
}

async fn websocket(
    State(state): State<ApiState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    query: Result<Query<SocketQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    // Taken before `WebSocketUpgrade` takes it: the connection is served on the upgraded socket
    // itself (see `realtime::outlet` for why not through axum's WebSocket).
    on_upgrade: Option<Extension<OnUpgrade>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // Refusals before the upgrade are plain HTTP answers, in the API's JSON like every other.
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => {
            return ApiError::new(e.status(), "not_a_websocket", e.body_text()).into_response();
        }
    };
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    if !valid_websocket_key(&headers) {
        return ApiError::bad_request(
            "Sec-WebSocket-Key must be the base64 of 16 bytes (RFC 6455 §4.2.1)",
        )
        .into_response();
    }
    // A missing vsn means 1.0.0; only the V2 serializer is spoken here.
    let major = query
        .vsn
        .as_deref()
        .unwrap_or("1.0.0")
        .split('.')
        .next()
        .unwrap_or("");
    if major != "2" {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "unsupported_version",
            "unsupported protocol version: connect with vsn=2.0.0",
        )
        .into_response();
    }
    let slot = match state.sockets.admission.admit(client.ip()) {
        Ok(slot) => slot,
        Err(full) => {
            let mut refused =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "full", full.to_string())
                    .into_response();
            refused
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return refused;
        }
    };
    // `WebSocketUpgrade` checked the request (and chose the subprotocol); the answer and the
    // socket are ours.
    let (Some(Extension(on_upgrade)), Some(key)) =
        (on_upgrade, headers.get(header::SEC_WEBSOCKET_KEY))
    else {
        return ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "not_a_websocket",
            "WebSocket request couldn't be upgraded since no upgrade state was present",
        )
        .into_response();
    };
    let upgrade = upgrade.protocols(["phoenix"]);
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let answer = response.headers_mut();
    answer.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    answer.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(accept) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        answer.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = upgrade.selected_protocol() {
        answer.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }
    let sockets = state.sockets.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => socket::serve(TokioIo::new(upgraded), sockets, slot).await,
            Err(e) => tracing::debug!(error = %e, "a WebSocket upgrade failed"),
        }
    });
    response
}

/// Whether the server takes work: its store answers, it is not shutting down, and (in a cluster)
/// it has joined.
#[utoipa::path(get, path = "/readyz", tag = "server",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: not joined, shutting down, or the store away", body = super::openapi::ApiErrorBody)))]
async fn ready(State(state): State<ApiState>) -> Response {
    if let Some(router) = &state.cluster
        && !router.membership().joined()
    {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_joined",
            "this node has not joined its cluster yet",
        )
        .into_response();
    }
    match state.zones.registry.store().ping().await {
        Ok(()) if !*state.sockets.shutdown.borrow() => {
            Json(json!({"status": "ready"})).into_response()
        }
        Ok(()) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is draining",
        )
        .into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
        .into_response(),
    }
}

async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "/metrics needs Authorization: Bearer <metrics token> (serve --metrics-token)",
            )
            .into_response();
        }
    }
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        )
            .into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string())
            .into_response(),
    }
}

fn zone_id(raw: &str) -> Result<Uuid, ApiError> {
    Ok(parse_zone_id(raw)?)
}

/// A zone as the API shows it: its settings and state, and where it stands in its history.
#[derive(Serialize, ToSchema)]
struct ZoneJson {
    #[serde(flatten)]
    zone: Zone,
    /// The seq of the zone's latest event.
    seq: u64,
    /// Its history's epoch: a client's `since` holds within one epoch.
    epoch: String,
}

impl From<ZoneView> for ZoneJson {
    fn from(v: ZoneView) -> Self {
        Self {
            zone: v.zone,
            seq: v.seq,
            epoch: v.epoch,
        }
    }
}

impl ZoneJson {
    /// In a cluster, `assigned_server` shows the node that writes the zone, where it is known.
    fn placed(mut self, state: &ApiState) -> Self {
        if let Some(owner) = state
            .cluster
            .as_ref()
            .and_then(|r| r.owner_name(self.zone.id))
        {
            self.zone.assigned_server = owner;
        }
        self
    }
}

/// How long an admin request waits for room in the pipeline, then for its answer.
const ROOM: std::time::Duration = std::time::Duration::from_secs(5);
const ANSWER: std::time::Duration = std::time::Duration::from_secs(30);

/// Applies an admin command to a zone through its writer; the accepted outcome, or the refusal
/// as an error.
async fn ask(state: &ApiState, id: Uuid, kind: CommandKind) -> Result<Outcome, ApiError> {
    let outcome = state
        .zones
        .ask(command(id, Actor::Admin, kind), ROOM, ANSWER)
        .await?;
    if let Err(refusal) = &outcome.result {
        return Err(refusal.clone().into());
    }
    Ok(outcome)
}

fn view(outcome: Outcome) -> Result<ZoneJson, ApiError> {
    match outcome.result {
        Ok(accepted) => match accepted.answer {
            Answer::State(view) => Ok((*view).into()),
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the zone answered without its state",
            )),
        },
        Err(refusal) => Err(refusal.into()),
    }
}

/// The first `limit` (1 to `max`; `default` when absent) of a list, from its `offset`th: every
/// list the API answers is paged alike.
fn page(
    limit: Option<u32>,
    offset: Option<u64>,
    default: u32,
    max: u32,
) -> Result<(u32, u64), ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max}"
        )));
    }
    let offset = offset.unwrap_or(0);
    if offset > MAX_POSITION {
        return Err(ApiError::bad_request(format!(
            "offset must be at most {MAX_POSITION}"
        )));
    }
    Ok((limit, offset))
}

/// The largest offset or seq a query takes: what the store counts in (a signed 64-bit integer),
/// and what the description's `int64` promises.
const MAX_POSITION: u64 = i64::MAX as u64;

/// A query's rejection, as our error.
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// A zone is created by its writer like any change: its `zone_created` is the first event of
/// its log. The answer comes once the zone and that event are stored.
#[utoipa::path(post, path = "/api/zones", tag = "zones", request_body = NewZone,
    responses((status = 201, description = "The zone, created (its `zone_created` is logged)", body = ZoneJson)))]
async fn create_zone(
    State(state): State<ApiState>,
    ApiJson(mut spec): ApiJson<NewZone>,
) -> Result<(StatusCode, Json<ZoneJson>), ApiError> {
    spec.assigned_server
        .get_or_insert_with(|| state.server_name.clone());
    let id = uuid::Uuid::now_v7();
    let zone = view(ask(&state, id, CommandKind::CreateZone(Box::new(spec))).await?)?;
    Ok((StatusCode::CREATED, Json(zone.placed(&state))))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Page {
    /// 1 to 500; 50 when absent.
    #[serde(default)]
    limit: Option<u32>,
    /// How many to skip; 0 when absent.
    #[serde(default)]
    offset: Option<u64>,
    /// Only zones whose name contains this (any case).
    #[serde(default)]
    q: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ZonePage {
    zones: Vec<ZoneJson>,
    limit: u32,
    offset: u64,
    total: u64,
}

/// The zones, by name (those whose name contains `q`, if given), in pages.
#[utoipa::path(get, path = "/api/zones", tag = "zones", params(Page),
    responses((status = 200, description = "A page of zones", body = ZonePage)))]
async fn list_zones(
    State(state): State<ApiState>,
    q: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ZonePage>, ApiError> {
    let asked = query(q)?;
    let (limit, offset) = page(asked.limit, asked.offset, 50, 500)?;
    let page = asked;
    let store = state.zones.registry.store();
    let zones = store
        .list_zones(limit, offset, page.q.as_deref())
        .await?
        .into_iter()
        // Zones in memory show their live state; the others, their last snapshot. A zone whose
        // deletion is decided but whose row is not removed yet is gone already.
        .filter_map(
            |snapshot| match state.zones.registry.live(snapshot.zone.id) {
                Some(live) => {
                    let live = live.state();
                    live.exists()
                        .then(|| ZoneJson::from(live.view()).placed(&state))
                }
                None => {
                    Some(ZoneJson::from(ZoneState::from_snapshot(snapshot).view()).placed(&state))
                }
            },
        )
        .collect();
    Ok(Json(ZonePage {
        zones,
        limit,
        offset,
        total: store.count_zones(page.q.as_deref()).await?,
    }))
}

#[utoipa::path(get, path = "/api/zones/{id}", tag = "zones", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)")),
    responses((status = 200, description = "The zone as its writer has it now", body = ZoneJson)))]
async fn get_zone(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ZoneJson>, ApiError> {
    let id = zone_id(&id)?;
    Ok(Json(
        view(ask(&state, id, CommandKind::GetZoneState).await?)?.placed(&state),
    ))
}

/// Changes a zone's name, capacity, properties or server; what is absent stays.
#[utoipa::path(patch, path = "/api/zones/{id}", tag = "zones", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)")), request_body = ZonePatch,
    responses((status = 200, description = "The zone, changed (its `zone_updated` is logged)", body = ZoneJson)))]
async fn patch_zone(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<ZonePatch>,
) -> Result<Json<ZoneJson>, ApiError> {
    let id = zone_id(&id)?;
    Ok(Json(
        view(ask(&state, id, CommandKind::UpdateZone(patch)).await?)?.placed(&state),
    ))
}

/// Deletes a zone: its sessions end, its channels close, `zone_deleted` is logged.
#[utoipa::path(delete, path = "/api/zones/{id}", tag = "zones", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)")),
    responses((status = 204, description = "Deleted")))]
async fn delete_zone(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = zone_id(&id)?;
    // Its writer decides it (`zone_deleted`: its sessions end, its channels close); the row goes
    // once that event is in the log.
    ask(&state, id, CommandKind::DeleteZone).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Permissions to add and to remove (bits or names); at least one of the two.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PermissionChange {
    #[serde(default)]
    grant: Option<Permissions>,
    #[serde(default)]
    revoke: Option<Permissions>,
}

#[utoipa::path(post, path = "/api/zones/{id}/permissions", tag = "zones", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)")), request_body = PermissionChange,
    responses((status = 200, description = "The zone with its new permissions", body = ZoneJson)))]
async fn change_permissions(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(change): ApiJson<PermissionChange>,
) -> Result<Json<ZoneJson>, ApiError> {
    let id = zone_id(&id)?;
    if change.grant.is_none() && change.revoke.is_none() {
        return Err(ApiError::bad_request(
            "send {\"grant\": [...]} or {\"revoke\": [...]}",
        ));
    }
    let grant = change.grant.unwrap_or_default();
    let revoke = change.revoke.unwrap_or_default();
    let kind = CommandKind::ChangePermissions { grant, revoke };
    Ok(Json(view(ask(&state, id, kind).await?)?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest {
    /// The event's name as subscribers see it.
    event_type: String,
    /// Any JSON object; `{}` when absent.
    #[serde(default)]
    #[schema(value_type = Object)]
    payload: serde_json::Map<String, Value>,
}

#[derive(Serialize, ToSchema)]
struct Broadcast {
    /// The event's seq in the zone's history.
    seq: Option<u64>,
}

/// `Zone.broadcast_zone_event(zone_id, event_type, payload)`: a custom event to every
/// subscriber of the zone, audited with its seq.
#[utoipa::path(post, path = "/api/zones/{id}/broadcast", tag = "zones", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)")), request_body = BroadcastRequest,
    responses((status = 200, description = "Sent to the zone's subscribers and logged", body = Broadcast)))]
async fn broadcast(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<BroadcastRequest>,
) -> Result<Json<Broadcast>, ApiError> {
    let id = zone_id(&id)?;
    let kind = CommandKind::BroadcastEvent {
        event_type: req.event_type,
        payload: req.payload,
    };
    let outcome = ask(&state, id, kind).await?;
    let seq = outcome
        .result
        .ok()
        .and_then(|a| a.events.last().map(|e| e.seq));
    Ok(Json(Broadcast { seq }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    /// The zone the agent moves to.
    to: String,
    /// The same key (1 to 64 characters) makes a retry the same migration: it moves the agent
    /// at most once, and is answered as the first was.
    #[schema(min_length = 1, max_length = 64)]
    idempotency_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct MigrationJson {
    agent_id: String,
    from: Uuid,
    /// The zone the agent is in now.
    zone: Uuid,
    /// The migration had been carried out before (a retry with the same key).
    duplicate: bool,
}

/// Moves a service's agent (every session it has in the zone) to another zone at once: the
/// other zone holds its places first (`migration_reserved`), this one ends its sessions
/// (`agent_left` with `reason: "migrated"` and `to`), and they begin there (`agent_entered`
/// with `from` and the agent's last `position`).
#[utoipa::path(post, path = "/api/zones/{id}/agents/{agent_id}/migrate", tag = "zones",
    params(("id" = uuid::Uuid, Path, description = "The zone the agent is in (a UUID)"),
           ("agent_id" = String, Path, description = "The agent to move")),
    request_body = MigrateRequest,
    responses((status = 200, description = "The agent is in the other zone", body = MigrationJson)))]
async fn migrate_agent(
    State(state): State<ApiState>,
    Path((id, agent_id)): Path<(String, String)>,
    ApiJson(req): ApiJson<MigrateRequest>,
) -> Result<Json<MigrationJson>, ApiError> {
    let from = zone_id(&id)?;
    let to = zone_id(&req.to)?;
    let id = match &req.idempotency_key {
        Some(key) if (1..=crate::runtime::IDEMPOTENCY_KEY_CHARS).contains(&key.chars().count()) => {
            crate::runtime::keyed_command_id(from, &agent_id, key)
        }
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_payload",
                "idempotency_key must be a string of 1 to 64 characters",
            ));
        }
        None => Uuid::now_v7(),
    };
    let migrated = state
        .migrations
        .migrate(crate::runtime::MigrationRequest {
            id,
            from,
            to,
            agent_id: agent_id.clone(),
            mover: crate::zone::Mover::Service,
        })
        .await?;
    Ok(Json(MigrationJson {
        agent_id,
        from,
        zone: to,
        duplicate: migrated.duplicate,
    }))
}

#[derive(Serialize, ToSchema)]
struct AgentSessions {
    agent_id: String,
    sessions: Vec<SessionJson>,
}

#[derive(Serialize, ToSchema)]
struct SessionJson {
    connection: String,
    joined_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    /// 1 to 1000; 100 when absent.
    limit: Option<u32>,
    /// How many to skip; 0 when absent.
    offset: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct AgentPage {
    zone_id: Uuid,
    /// The zone's seq when it answered.
    seq: u64,
    /// By agent id.
    agents: Vec<AgentSessions>,
    limit: u32,
    offset: u64,
    total: u64,
}

/// `Presence.get_zone_agents`: the agents present, with their sessions.
#[utoipa::path(get, path = "/api/zones/{id}/agents", tag = "zones", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)"), PageQuery),
    responses((status = 200, description = "A page of the agents present, with their sessions", body = AgentPage)))]
async fn zone_agents(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AgentPage>, ApiError> {
    let id = zone_id(&id)?;
    let asked = query(q)?;
    let (limit, offset) = page(asked.limit, asked.offset, 100, 1000)?;
    // Asked of the zone's writer (on whichever node it runs): its answer comes after every
    // command sent before this request.
    let outcome = ask(&state, id, CommandKind::GetAgents).await?;
    let Ok(Accepted {
        answer: Answer::Sessions { seq, sessions },
        ..
    }) = outcome.result
    else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the zone answered without its sessions",
        ));
    };
    // Sessions are keyed by connection first: gather each agent's.
    let mut by_agent: std::collections::BTreeMap<String, Vec<SessionJson>> = Default::default();
    for session in sessions {
        by_agent
            .entry(session.agent_id)
            .or_default()
            .push(SessionJson {
                connection: session.connection,
                joined_at: session.joined_at,
            });
    }
    let total = by_agent.len() as u64;
    let agents: Vec<AgentSessions> = by_agent
        .into_iter()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .take(limit as usize)
        .map(|(agent_id, sessions)| AgentSessions { agent_id, sessions })
        .collect();
    Ok(Json(AgentPage {
        zone_id: id,
        seq,
        agents,
        limit,
        offset,
        total,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    /// 1 to 200 bytes.
    agent_id: String,
    zone_id: String,
    /// Bits, a name, or a list of them; `spawn_agents` when absent (as the CLI).
    #[serde(default = "default_token_permissions")]
    permissions: Permissions,
    /// Seconds (`3600`), or a number with a unit (`"90m"`, `"1h"`, `"7d"`), as the CLI takes
    /// them; an hour when absent (as the CLI).
    #[serde(default = "default_token_ttl", deserialize_with = "duration_seconds")]
    #[schema(schema_with = duration_schema)]
    ttl_seconds: u64,
}

/// Seconds above 0, or a number with a unit (`s`, `m`, `h`, `d`).
fn duration_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]+[smhd]?$"))
                .examples(["90m", "1h", "7d"]),
        )
        .description(Some(
            "Seconds, or a number with a unit (\"90m\", \"1h\", \"7d\"); an hour when absent",
        ))
        .into()
}

#[derive(Serialize, ToSchema)]
struct MintedToken {
    /// What the agent joins with (`{"token": …}` in the join's payload).
    token: String,
    expires_at: chrono::DateTime<chrono::Utc>,
}

fn default_token_permissions() -> Permissions {
    Permissions::SPAWN_AGENTS
}

fn default_token_ttl() -> u64 {
    3600
}

/// A span of time in seconds, or a string in one of the CLI's forms ([`super::seconds`]).
fn duration_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Span {
        Seconds(u64),
        Text(String),
    }
    const EXPECTED: &str = "ttl_seconds must be a whole number of seconds above 0, or a string such as \"90m\", \"1h\" or \"7d\"";
    let seconds = match Span::deserialize(d).map_err(|_| serde::de::Error::custom(EXPECTED))? {
        Span::Seconds(n) => n,
        Span::Text(t) => super::seconds(t.trim()).map_err(serde::de::Error::custom)?,
    };
    if seconds == 0 {
        return Err(serde::de::Error::custom(EXPECTED));
    }
    Ok(seconds)
}

fn check_agent_id(agent_id: &str) -> Result<(), ApiError> {
    if agent_id.trim().is_empty()
        || agent_id.len() > crate::zone::limits::MAX_AGENT_ID_BYTES
        || agent_id.contains('\0')
    {
        return Err(ApiError::bad_request(
            "agent_id must be 1 to 200 bytes, without NUL",
        ));
    }
    Ok(())
}

/// A join token for one agent in one zone, with its permissions there.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens", request_body = TokenRequest,
    responses((status = 200, description = "The token", body = MintedToken)))]
async fn mint_token(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<MintedToken>, ApiError> {
    let zone = zone_id(&req.zone_id)?;
    check_agent_id(&req.agent_id)?;
    let perms = req.permissions;
    if req.ttl_seconds > state.max_token_ttl {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl_too_long",
            format!(
                "ttl_seconds {} is above this server's maximum of {} (serve --max-token-ttl)",
                req.ttl_seconds, state.max_token_ttl
            ),
        ));
    }
    if !state.zones.exists(zone).await? {
        return Err(ZoneError::ZoneNotFound(zone).into());
    }
    let (token, claims) = state
        .signer
        .mint(
            &req.agent_id,
            zone,
            perms,
            i64::try_from(req.ttl_seconds).unwrap_or(i64::MAX),
            chrono::Utc::now(),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(MintedToken {
        token,
        expires_at: claims.expires_at(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    agent_id: String,
    zone_id: String,
}

#[derive(Serialize, ToSchema)]
struct Revoked {
    agent_id: String,
    zone_id: Uuid,
    /// Tokens minted before this no longer open sessions.
    revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Revokes every token `agent_id` holds for the zone: they open no more sessions, and the
/// sessions they opened end now. Tokens minted afterwards work. Recorded before it takes
/// effect, so it outlives a restart.
#[utoipa::path(post, path = "/api/tokens/revoke", tag = "tokens", request_body = RevokeRequest,
    responses((status = 200, description = "Revoked, on every node of a cluster", body = Revoked)))]
async fn revoke_tokens(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<Revoked>, ApiError> {
    let zone = zone_id(&req.zone_id)?;
    check_agent_id(&req.agent_id)?;
    let revocation = Revocation {
        agent_id: req.agent_id,
        zone_id: zone,
        before_us: chrono::Utc::now().timestamp_micros(),
    };
    let revoked_at = chrono::DateTime::from_timestamp_micros(revocation.before_us);
    let agent_id = revocation.agent_id.clone();
    // Recorded and put in force together, even if the client goes away meanwhile (which
    // drops this handler): a revocation on disk must never wait for a restart to apply.
    let zones = state.zones.clone();
    let revocations = state.sockets.revocations.clone();
    let cluster = state.cluster.clone();
    tokio::spawn(async move {
        if !zones.exists(zone).await? {
            return Err(ZoneError::ZoneNotFound(zone).into());
        }
        zones
            .registry
            .store()
            .revoke_tokens(&revocation.agent_id, zone, revocation.before_us)
            .await?;
        // In a cluster the agent's sessions may be on any node: each is told (one that misses
        // the announcement, NATS being away, has it from the store at its next start).
        if let Some(cluster) = &cluster
            && let Err(e) = cluster.announce_revocation(&revocation).await
        {
            tracing::warn!(error = %e, "a revocation could not be announced to the other nodes");
        }
        revocations.revoke(revocation);
        Ok::<_, StoreError>(())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Json(Revoked {
        agent_id,
        zone_id: zone,
        revoked_at,
    }))
}

/// The router of a node of a cluster; 404 on a server that is not one.
fn clustered(state: &ApiState) -> Result<&Arc<crate::cluster::Router>, ApiError> {
    state.cluster.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this server does not run as a node of a cluster (serve --cluster)",
        )
    })
}

#[derive(Serialize, ToSchema)]
struct ClusterView {
    /// The node that answered.
    node: String,
    nodes: Vec<crate::cluster::membership::NodeView>,
    /// A page of the zones in memory on a node, by id, each with the node that writes it.
    zones: Vec<ZoneOwner>,
    limit: u32,
    offset: u64,
    /// How many zones are in memory on the nodes.
    total: u64,
}

#[derive(Serialize, ToSchema)]
struct ZoneOwner {
    zone_id: Uuid,
    owner: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ClusterQuery {
    /// Zones per page, 1 to 10000; 1000 when absent.
    limit: Option<u32>,
    /// How many zones to skip; 0 when absent.
    offset: Option<u64>,
}

/// The cluster as this node sees it: its nodes (alive, incarnation, zones owned, connections,
/// commands forwarded per second) and a page of the zones' owners.
#[utoipa::path(get, path = "/api/cluster", tag = "cluster", params(ClusterQuery),
    responses((status = 200, description = "The nodes and a page of the zones' owners", body = ClusterView)))]
async fn cluster_view(
    State(state): State<ApiState>,
    q: Result<Query<ClusterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ClusterView>, ApiError> {
    let q = query(q)?;
    let (limit, offset) = page(q.limit, q.offset, 1000, 10_000)?;
    let router = clustered(&state)?;
    let owners = router.owners();
    let total = owners.len() as u64;
    let zones = owners
        .into_iter()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .take(limit as usize)
        .map(|(zone_id, owner)| ZoneOwner { zone_id, owner })
        .collect();
    Ok(Json(ClusterView {
        node: router.me().name.clone(),
        nodes: router.membership().nodes(),
        zones,
        limit,
        offset,
        total,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    /// The node's name (`serve --node-name`).
    node: String,
}

#[derive(Serialize, ToSchema)]
struct Drained {
    node: String,
    draining: bool,
    zones_handed_over: u64,
}

/// Hands a node's zones to the others without stopping it; it takes no zone until it is
/// started again.
#[utoipa::path(post, path = "/api/cluster/drain", tag = "cluster", request_body = DrainRequest,
    responses((status = 200, description = "The node's zones are handed to the others", body = Drained)))]
async fn drain_node(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<DrainRequest>,
) -> Result<Json<Drained>, ApiError> {
    let router = clustered(&state)?;
    match router.drain_node(&req.node).await {
        Ok(handed) => Ok(Json(Drained {
            node: req.node,
            draining: true,
            zones_handed_over: handed,
        })),
        Err(e @ crate::cluster::ClusterError::UnknownNode(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "node_not_found",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only events at or after this time (RFC 3339).
    since: Option<String>,
    /// Only events after this seq.
    after_seq: Option<u64>,
    /// 1 to 1000; 100 when absent.
    limit: Option<u32>,
    /// How many of those that match to skip; 0 when absent.
    offset: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct EventPage {
    /// In seq order.
    #[schema(value_type = Vec<crate::zone::WireEvent>)]
    events: Vec<crate::zone::ZoneEvent>,
    limit: u32,
    offset: u64,
    /// How many events match `since` and `after_seq`.
    total: u64,
}

/// A zone's audit log, in seq order.
#[utoipa::path(get, path = "/api/zones/{id}/events", tag = "audit", params(("id" = uuid::Uuid, Path, description = "The zone's id (a UUID)"), EventsQuery),
    responses((status = 200, description = "A page of the zone's logged events", body = EventPage)))]
async fn zone_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let id = zone_id(&id)?;
    let q = query(q)?;
    let since = q
        .since
        .as_deref()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| ApiError::bad_request(format!("since {s:?} is not an RFC 3339 time")))
        })
        .transpose()?;
    let (limit, offset) = page(q.limit, q.offset, 100, 1000)?;
    if q.after_seq.is_some_and(|after| after > MAX_POSITION) {
        return Err(ApiError::bad_request(format!(
            "after_seq must be at most {MAX_POSITION}"
        )));
    }
    let store = state.zones.registry.store();
    let events = store
        .zone_events_from(id, since, q.after_seq, Some(limit), offset)
        .await?;
    let total = store.count_zone_events(id, since, q.after_seq).await?;
    if total == 0 && !state.zones.exists(id).await? {
        // None: say so if the zone does not exist at all.
        return Err(ZoneError::ZoneNotFound(id).into());
    }
    Ok(Json(EventPage {
        events,
        limit,
        offset,
        total,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    /// Only this zone's.
    zone_id: Option<String>,
    /// 1 to 1000; 100 when absent.
    limit: Option<u32>,
    /// How many to skip; 0 when absent.
    offset: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct DeadLetterPage {
    dead_letters: Vec<DeadLetter>,
    limit: u32,
    offset: u64,
    total: u64,
}

/// Events the audit log refused as data, oldest first, with the database's reason.
#[utoipa::path(get, path = "/api/dead_letters", tag = "audit", params(DeadLetterQuery),
    responses((status = 200, description = "A page of dead letters", body = DeadLetterPage)))]
async fn dead_letters(
    State(state): State<ApiState>,
    q: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let q = query(q)?;
    let zone = q.zone_id.as_deref().map(zone_id).transpose()?;
    let (limit, offset) = page(q.limit, q.offset, 100, 1000)?;
    let store = state.zones.registry.store();
    Ok(Json(DeadLetterPage {
        dead_letters: store.dead_letters(zone, limit, offset).await?,
        limit,
        offset,
        total: store.count_dead_letters(zone).await?,
    }))
}
