//! The OpenAPI 3.0 document of the HTTP/JSON API, generated at start from the routes and the
//! descriptors, so it cannot drift from what the gateway does: paths and methods from the
//! routes, path and query parameters from the request messages, schemas from the messages in the
//! proto3 JSON mapping (lowerCamelCase names, 64-bit integers as decimal strings, bytes as base64,
//! Duration as "1.5s", Timestamp as RFC 3339, enums by name), and every error as
//! `google.rpc.Status`.

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{json, Map, Value};

use super::routes::Route;

const STATUS: &str = "google.rpc.Status";

/// The document for `routes`.
pub fn document(pool: &DescriptorPool, routes: &[Route]) -> Value {
    let mut schemas = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    if let Some(status) = pool.get_message_by_name(STATUS) {
        add_schema(&status, &mut schemas);
    }
    for route in routes {
        let input = route.method.input();
        let output = route.method.output();
        add_schema(&output, &mut schemas);
        let mut parameters: Vec<Value> = route
            .path_fields
            .iter()
            .map(|field| {
                json!({
                    "name": field.name(),
                    "in": "path",
                    "required": true,
                    "description": "Percent-encoded: a '/' in the value is sent as %2F.",
                    "schema": {"type": "string"},
                })
            })
            .collect();
        let unbound: Vec<FieldDescriptor> = input
            .fields()
            .filter(|field| !route.path_fields.contains(field))
            .collect();
        let mut operation = Map::new();
        operation.insert(
            "operationId".into(),
            json!(format!(
                "{}_{}",
                route.method.parent_service().name(),
                route.method.name()
            )),
        );
        operation.insert(
            "summary".into(),
            json!(format!("{} (gRPC {})", route.method.name(), route.grpc_uri)),
        );
        operation.insert(
            "tags".into(),
            json!([route.method.parent_service().full_name()]),
        );
        if route.body {
            let mut properties = Map::new();
            for field in &unbound {
                properties.insert(field.json_name().into(), field_schema(field, &mut schemas));
            }
            operation.insert(
                "requestBody".into(),
                json!({
                    "required": true,
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": properties,
                        "additionalProperties": false,
                    }}},
                }),
            );
        } else {
            for field in &unbound {
                if field
                    .kind()
                    .as_message()
                    .is_some_and(|m| !is_string_type(m))
                {
                    continue;
                }
                parameters.push(json!({
                    "name": field.json_name(),
                    "in": "query",
                    "required": false,
                    "schema": field_schema(field, &mut schemas),
                }));
            }
        }
        operation.insert("parameters".into(), Value::Array(parameters));
        operation.insert(
            "responses".into(),
            json!({
                "200": {
                    "description": "The RPC's response.",
                    "content": {"application/json": {"schema": reference(output.full_name())}},
                },
                "default": {
                    "description": "The RPC's status (google.rpc.Status, its details with the ErrorInfo reason); HTTP status by the table in the README.",
                    "content": {"application/json": {"schema": reference(STATUS)}},
                },
            }),
        );
        paths.entry(route.template.clone()).or_default().insert(
            route.http_method.as_str().to_ascii_lowercase(),
            Value::Object(operation),
        );
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "idemd HTTP/JSON API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "idempotency.v1 and idempotency.admin.v1 over HTTP/JSON, on the gRPC listener. Generated from the protos and their google.api.http options.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    })
}

fn reference(full_name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{full_name}")})
}

/// Well-known types whose JSON form is a string.
fn is_string_type(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Duration" | "google.protobuf.Timestamp"
    )
}

/// Adds `message` and every message it refers to.
fn add_schema(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) {
    if schemas.contains_key(message.full_name()) || is_string_type(message) {
        return;
    }
    if message.full_name() == "google.protobuf.Any" {
        schemas.insert(
            message.full_name().into(),
            json!({
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": true,
            }),
        );
        return;
    }
    // A placeholder first, so a recursive message refers to itself instead of looping.
    schemas.insert(message.full_name().into(), Value::Null);
    let mut properties = Map::new();
    for field in message.fields() {
        properties.insert(field.json_name().into(), field_schema(&field, schemas));
    }
    schemas.insert(
        message.full_name().into(),
        json!({
            "type": "object",
            "properties": properties,
            "additionalProperties": false,
        }),
    );
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if field.is_map() {
        let value = field
            .kind()
            .as_message()
            .and_then(|entry| entry.get_field_by_name("value"))
            .map(|value| kind_schema(&value.kind(), schemas))
            .unwrap_or_else(|| json!({}));
        return json!({"type": "object", "additionalProperties": value});
    }
    let schema = kind_schema(&field.kind(), schemas);
    if field.is_list() {
        json!({"type": "array", "items": schema})
    } else {
        schema
    }
}

fn kind_schema(kind: &Kind, schemas: &mut BTreeMap<String, Value>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"})
        }
        Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$"})
        }
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Enum(descriptor) => {
            let names: Vec<String> = descriptor
                .values()
                .map(|value| value.name().to_string())
                .collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(message) => match message.full_name() {
            "google.protobuf.Duration" => json!({
                "type": "string",
                "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,9})?s$",
                "example": "30s",
            }),
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            _ => {
                add_schema(message, schemas);
                reference(message.full_name())
            }
        },
    }
}
