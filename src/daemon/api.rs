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
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
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
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is over the admin API's limit of {ADMIN_BODY_LIMIT} bytes"),
                ),
                _ => ApiError::bad_request(e.body_text()),
            })
    }
}

/// The server's routes; `/metrics` among them unless it is served elsewhere
/// ([`metrics_router`] on `serve --metrics-listen`).
pub fn router(state: ApiState, with_metrics: bool) -> Router {
    let admin = Router::new()
        .route("/api/zones", post(create_zone).get(list_zones))
        .route(
            "/api/zones/{id}",
            get(get_zone).patch(patch_zone).delete(delete_zone),
        )
        .route("/api/zones/{id}/permissions", post(change_permissions))
        .route("/api/zones/{id}/events", get(zone_events))
        .route("/api/zones/{id}/broadcast", post(broadcast))
        .route("/api/zones/{id}/agents", get(zone_agents))
        .route("/api/dead_letters", get(dead_letters))
        .route("/api/cluster", get(cluster_view))
        .route("/api/cluster/drain", post(drain_node))
        .route("/api/tokens", post(mint_token))
        .route("/api/tokens/revoke", post(revoke_tokens))
        .merge(control::routes())
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let public = Router::new()
        .merge(admin)
        .route("/socket/websocket", get(websocket))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .merge(super::console::routes());
    let public = if with_metrics {
        public.route("/metrics", get(metrics))
    } else {
        public
    };
    public.with_state(state)
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
    Query(query): Query<SocketQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !valid_websocket_key(&headers) {
        return (
            StatusCode::BAD_REQUEST,
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
        return (
            StatusCode::FORBIDDEN,
            "unsupported protocol version: connect with vsn=2.0.0",
        )
            .into_response();
    }
    let slot = match state.sockets.admission.admit(client.ip()) {
        Ok(slot) => slot,
        Err(full) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                full.to_string(),
            )
                .into_response();
        }
    };
    let max = state.sockets.config.max_frame_bytes;
    let sockets = state.sockets.clone();
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // tungstenite's defaults (128 KiB each way) would cost most of a connection's memory;
        // frames here are small, and the writer batches them before a flush.
        .read_buffer_size(1024)
        .write_buffer_size(2 * 1024)
        .protocols(["phoenix"])
        .on_upgrade(move |ws| socket::serve(ws, sockets, slot))
}

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
#[derive(Serialize)]
struct ZoneJson {
    #[serde(flatten)]
    zone: Zone,
    seq: u64,
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

/// A zone is created by its writer like any change: its `zone_created` is the first event of
/// its log. The answer comes once the zone and that event are stored.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    offset: Option<u64>,
    /// Only zones whose name contains this (any case).
    #[serde(default)]
    q: Option<String>,
}

#[derive(Serialize)]
struct ZonePage {
    zones: Vec<ZoneJson>,
    limit: u32,
    offset: u64,
    total: u64,
}

async fn list_zones(
    State(state): State<ApiState>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ZonePage>, ApiError> {
    let Query(page) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 500"));
    }
    let offset = page.offset.unwrap_or(0);
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

async fn get_zone(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ZoneJson>, ApiError> {
    let id = zone_id(&id)?;
    Ok(Json(
        view(ask(&state, id, CommandKind::GetZoneState).await?)?.placed(&state),
    ))
}

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

/// A permission by name (`"modify_zone"`) or bits (`2`, `"0x02"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum PermissionName {
    Bits(u32),
    Name(String),
}

impl PermissionName {
    fn parse(&self) -> Result<Permissions, ZoneError> {
        match self {
            Self::Bits(b) => Permissions::from_bits_checked(*b),
            Self::Name(n) => n.parse(),
        }
    }
}

fn parse_all(names: &[PermissionName]) -> Result<Permissions, ZoneError> {
    names
        .iter()
        .try_fold(Permissions::empty(), |acc, n| Ok(acc | n.parse()?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionChange {
    #[serde(default)]
    grant: Option<Vec<PermissionName>>,
    #[serde(default)]
    revoke: Option<Vec<PermissionName>>,
}

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
    let grant = parse_all(change.grant.as_deref().unwrap_or_default())?;
    let revoke = parse_all(change.revoke.as_deref().unwrap_or_default())?;
    let kind = CommandKind::ChangePermissions { grant, revoke };
    Ok(Json(view(ask(&state, id, kind).await?)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest {
    event_type: String,
    #[serde(default)]
    payload: serde_json::Map<String, Value>,
}

/// `Zone.broadcast_zone_event(zone_id, event_type, payload)`: a custom event to every
/// subscriber of the zone, audited with its seq.
async fn broadcast(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<BroadcastRequest>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({"seq": seq})))
}

#[derive(Serialize)]
struct AgentSessions {
    agent_id: String,
    sessions: Vec<SessionJson>,
}

#[derive(Serialize)]
struct SessionJson {
    connection: String,
    joined_at: chrono::DateTime<chrono::Utc>,
}

/// `Presence.get_zone_agents`: the agents present, with their sessions.
async fn zone_agents(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = zone_id(&id)?;
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
    let agents: Vec<AgentSessions> = by_agent
        .into_iter()
        .map(|(agent_id, sessions)| AgentSessions { agent_id, sessions })
        .collect();
    Ok(Json(json!({"zone_id": id, "seq": seq, "agents": agents})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    agent_id: String,
    zone_id: String,
    permissions: Value,
    ttl_seconds: i64,
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

async fn mint_token(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<Value>, ApiError> {
    let zone = zone_id(&req.zone_id)?;
    check_agent_id(&req.agent_id)?;
    let perms = match &req.permissions {
        Value::Array(items) => {
            let names: Vec<PermissionName> = serde_json::from_value(Value::Array(items.clone()))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            parse_all(&names)?
        }
        other => serde_json::from_value::<PermissionName>(other.clone())
            .map_err(|_| {
                ApiError::bad_request("permissions must be bits, a name, or a list of them")
            })?
            .parse()?,
    };
    if u64::try_from(req.ttl_seconds).is_ok_and(|ttl| ttl > state.max_token_ttl) {
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
            req.ttl_seconds,
            chrono::Utc::now(),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(
        json!({"token": token, "expires_at": claims.expires_at()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    agent_id: String,
    zone_id: String,
}

/// Revokes every token `agent_id` holds for the zone: they open no more sessions, and the
/// sessions they opened end now. Tokens minted afterwards work. Recorded before it takes
/// effect, so it outlives a restart.
async fn revoke_tokens(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({
        "agent_id": agent_id,
        "zone_id": zone,
        "revoked_at": revoked_at,
    })))
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

/// The cluster as this node sees it: its nodes (alive, incarnation, zones owned, connections,
/// commands forwarded per second) and each zone's owner.
async fn cluster_view(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let router = clustered(&state)?;
    let zones: Vec<Value> = router
        .owners()
        .into_iter()
        .map(|(zone, owner)| json!({"zone_id": zone, "owner": owner}))
        .collect();
    Ok(Json(json!({
        "node": router.me().name,
        "nodes": router.membership().nodes(),
        "zones": zones,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    node: String,
}

/// Hands a node's zones to the others without stopping it; it takes no zone until it is
/// started again.
async fn drain_node(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<DrainRequest>,
) -> Result<Json<Value>, ApiError> {
    let router = clustered(&state)?;
    match router.drain_node(&req.node).await {
        Ok(handed) => Ok(Json(json!({
            "node": req.node,
            "draining": true,
            "zones_handed_over": handed,
        }))),
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<String>,
    after_seq: Option<u64>,
    limit: Option<u32>,
}

async fn zone_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<crate::zone::ZoneEvent>>, ApiError> {
    let id = zone_id(&id)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let since = q
        .since
        .as_deref()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| ApiError::bad_request(format!("since {s:?} is not an RFC 3339 time")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let store = state.zones.registry.store();
    let events = store
        .zone_events(id, since, q.after_seq, Some(limit))
        .await?;
    if events.is_empty() && !state.zones.exists(id).await? {
        // None: say so if the zone does not exist at all.
        return Err(ZoneError::ZoneNotFound(id).into());
    }
    Ok(Json(events))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    zone_id: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
}

/// Events the audit log refused as data, oldest first, with the database's reason.
async fn dead_letters(
    State(state): State<ApiState>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let zone = q.zone_id.as_deref().map(zone_id).transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let store = state.zones.registry.store();
    Ok(Json(
        store
            .dead_letters(zone, limit, q.offset.unwrap_or(0))
            .await?,
    ))
}
