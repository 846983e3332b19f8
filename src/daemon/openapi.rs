//! The admin API's OpenAPI 3.1 description, served at `GET /api/openapi.json`: generated from
//! the same registration as the routes themselves (`utoipa-axum`), so a route cannot be served
//! undescribed, nor described unserved.
//!
//! What every admin operation shares is added here once, not per handler: the admin token (a
//! bearer token) and the errors any of them can answer, each `{"error", "details"}`.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{OpenApi, PartialSchema, ToSchema};

use super::api;

/// Every error the API answers, whatever the status.
#[derive(Serialize, ToSchema)]
pub struct ApiErrorBody {
    /// A short name a program can match (`zone_not_found`, `unauthorized`, `bad_request`…).
    pub error: String,
    /// What went wrong, for a person.
    pub details: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Thunderline admin API",
        description = "Zones, their events and agents, join tokens, the pipeline's controls and \
                       the cluster. Every request but this description's and the health checks' \
                       carries the admin token (`Authorization: Bearer <token>`; `serve` prints \
                       where it is kept). Every error is `{\"error\", \"details\"}`. Lists are \
                       pages: `limit` and `offset` in the query, `limit`, `offset` and `total` \
                       in the answer. Permissions are bits or names (`[\"spawn_agents\", \
                       \"modify_zone\"]`), durations seconds or with a unit (`\"1h\"`).",
        license(name = "MIT OR Apache-2.0")
    ),
    tags(
        (name = "zones", description = "Zones: create, read, change, delete, broadcast"),
        (name = "audit", description = "The audit log: a zone's events, dead letters"),
        (name = "tokens", description = "Join tokens for agents, and their revocation"),
        (name = "pipeline", description = "The zone pipeline's run-time controls"),
        (name = "cluster", description = "The nodes of a cluster and who writes which zone"),
        (name = "server", description = "This description and the health checks")
    )
)]
struct Description;

/// The description: the admin routes' (with the admin token and the shared errors) and the
/// public ones'.
pub fn description() -> utoipa::openapi::OpenApi {
    let mut doc = Description::openapi();
    let (_, mut admin) = api::admin_routes().split_for_parts();
    for item in admin.paths.paths.values_mut() {
        for op in operations(item) {
            admin_operation(op);
        }
    }
    let (_, public) = api::public_routes().split_for_parts();
    doc.merge(admin);
    doc.merge(public);
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert(ApiErrorBody::name().into_owned(), ApiErrorBody::schema());
    components.add_security_scheme(
        ADMIN_TOKEN,
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    doc
}

const ADMIN_TOKEN: &str = "admin_token";

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.patch,
        &mut item.delete,
    ]
    .into_iter()
    .flatten()
}

/// The admin token, and the errors any admin operation can answer: bad input, no or a wrong
/// token, nothing there (a zone, a batcher, a node; or not a cluster), a conflict, a refusal,
/// and not now (overloaded, shutting down, the store away); a body over the limit where one is
/// taken.
fn admin_operation(op: &mut Operation) {
    op.security = Some(vec![SecurityRequirement::new(
        ADMIN_TOKEN,
        Vec::<String>::new(),
    )]);
    let mut errors = vec![
        ("400", "Bad input: a malformed id, query or body"),
        ("401", "No admin token, or the wrong one"),
        ("403", "The zone does not hold the permission this needs"),
        (
            "404",
            "No such zone (or batcher, or node; or this server is not a node of a cluster)",
        ),
        ("409", "The zone's state does not allow it"),
        ("422", "Refused: the request is well formed but not allowed"),
        (
            "503",
            "Not now: the pipeline is full or shutting down, or the store is away",
        ),
    ];
    if op.request_body.is_some() {
        errors.push(("413", "The body is over the admin API's limit (128 KiB)"));
        errors.push(("415", "The body is not sent as `application/json`"));
    }
    for (status, description) in errors {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description));
    }
}

pub(super) fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(ApiErrorBody::name())))
                    .build(),
            )
            .build(),
    )
}

/// The description as served: made once.
static SERVED: LazyLock<String> = LazyLock::new(|| {
    description()
        .to_json()
        .expect("the OpenAPI description serializes")
});

/// This description (OpenAPI 3.1). No token needed.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "server",
    responses((status = 200, description = "The admin API's OpenAPI 3.1 description", content_type = "application/json", body = Object))
)]
pub(super) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        SERVED.as_str(),
    )
        .into_response()
}
