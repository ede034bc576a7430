//! The gateway's routes, read at start from each RPC's `option (google.api.http)` (a
//! `google.api.HttpRule` in the proto, proto/google/api/http.proto) and checked against the
//! descriptors: every unary RPC of the served services has a route, every path variable names a
//! string field of its request, and no two RPCs share a route.

use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MethodDescriptor};
use serde::Deserialize;
use tonic::codegen::http::{Method, Uri};

/// The services whose every RPC must have a route.
const SERVED: &[&str] = &[
    "idempotency.v1.IdempotencyService",
    "idempotency.admin.v1.AdminService",
];

/// The method option that holds a route (proto/google/api/annotations.proto).
const HTTP_EXTENSION: &str = "google.api.http";

/// One `google.api.HttpRule`, read through its proto3 JSON form, without `selector` (which only a
/// service config uses), `custom`, `response_body` and `additional_bindings`, which idemd does
/// not use: an option that sets them fails start.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRule {
    get: Option<String>,
    post: Option<String>,
    put: Option<String>,
    delete: Option<String>,
    patch: Option<String>,
    #[serde(default)]
    body: String,
}

impl HttpRule {
    fn from_message(message: &DynamicMessage) -> Result<Self, String> {
        let json = serde_json::to_value(message).map_err(|error| error.to_string())?;
        serde_json::from_value(json).map_err(|error| error.to_string())
    }
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{field}`: one path segment, percent-decoded into the request's string field.
    Field(String),
}

/// A route: an HTTP method and path template bound to an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    pub http_method: Method,
    /// The template as written, e.g. `/v1/namespaces/{namespace}/keys/{key}:acquire`.
    pub template: String,
    segments: Vec<Segment>,
    verb: Option<String>,
    /// `body: "*"`: the fields not in the path come as a JSON body; else as query parameters.
    pub body: bool,
    pub method: MethodDescriptor,
    /// The RPC's gRPC path, e.g. `/idempotency.v1.IdempotencyService/Acquire`.
    pub grpc_uri: Uri,
    /// The request fields the path binds, in template order.
    pub path_fields: Vec<FieldDescriptor>,
}

/// What a request path made of a route's template.
pub enum PathMatch {
    /// The path fits: each bound field with its raw (still percent-encoded) segment.
    Fits(Vec<(FieldDescriptor, String)>),
    NoMatch,
}

impl Route {
    /// Matches `path` (the raw path of the request URI, without the query).
    pub fn match_path(&self, path: &str) -> PathMatch {
        let Some(rest) = path.strip_prefix('/') else {
            return PathMatch::NoMatch;
        };
        // The verb is the text after the last ':' of the last segment; a key may hold ':' itself
        // ("a:b:acquire" is key "a:b"), and a template without a verb takes the segment whole.
        let rest = match &self.verb {
            Some(verb) => match rest
                .strip_suffix(verb.as_str())
                .and_then(|rest| rest.strip_suffix(':'))
            {
                Some(rest) => rest,
                None => return PathMatch::NoMatch,
            },
            None => rest,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() != self.segments.len() {
            return PathMatch::NoMatch;
        }
        let mut bound = Vec::new();
        let mut fields = self.path_fields.iter();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(literal) if literal == part => {}
                Segment::Literal(_) => return PathMatch::NoMatch,
                Segment::Field(_) => match fields.next() {
                    Some(field) => bound.push((field.clone(), part.to_string())),
                    None => return PathMatch::NoMatch,
                },
            }
        }
        PathMatch::Fits(bound)
    }
}

/// Why the routes could not be built (a defect of the shipped protos: idemd does not start).
#[derive(Debug, thiserror::Error)]
#[error("HTTP routes, {rpc}: {problem}")]
pub struct RouteError {
    rpc: String,
    problem: String,
}

/// The routes of every RPC of the served services.
pub fn load(pool: &DescriptorPool) -> Result<Vec<Route>, RouteError> {
    let Some(http) = pool.get_extension_by_name(HTTP_EXTENSION) else {
        return Err(RouteError {
            rpc: "descriptors".into(),
            problem: format!("the extension {HTTP_EXTENSION} is missing"),
        });
    };
    let mut routes: Vec<Route> = Vec::new();
    for service in SERVED {
        let Some(service) = pool.get_service_by_name(service) else {
            return Err(RouteError {
                rpc: "descriptors".into(),
                problem: format!("service {service} is missing"),
            });
        };
        for method in service.methods() {
            let fail = |problem: String| RouteError {
                rpc: method.full_name().to_string(),
                problem,
            };
            let options = method.options();
            if !options.has_extension(&http) {
                return Err(fail(format!(
                    "has no HTTP route (option ({HTTP_EXTENSION}))"
                )));
            }
            let rule = match options.get_extension(&http).as_message() {
                Some(message) => HttpRule::from_message(message).map_err(fail)?,
                None => return Err(fail(format!("{HTTP_EXTENSION} is not a message"))),
            };
            let route = build(method.clone(), rule).map_err(fail)?;
            if let Some(other) = routes.iter().find(|other| {
                other.http_method == route.http_method
                    && other.segments == route.segments
                    && other.verb == route.verb
            }) {
                return Err(fail(format!(
                    "{} {} is bound twice ({} and {})",
                    route.http_method,
                    route.template,
                    other.method.full_name(),
                    route.method.full_name()
                )));
            }
            routes.push(route);
        }
    }
    Ok(routes)
}

fn build(method: MethodDescriptor, rule: HttpRule) -> Result<Route, String> {
    let patterns = [
        (Method::GET, rule.get),
        (Method::POST, rule.post),
        (Method::PUT, rule.put),
        (Method::DELETE, rule.delete),
        (Method::PATCH, rule.patch),
    ];
    let mut set = patterns
        .into_iter()
        .filter_map(|(method, template)| template.map(|template| (method, template)));
    let (Some((http_method, template)), None) = (set.next(), set.next()) else {
        return Err("exactly one of get, post, put, delete, patch".into());
    };
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err("only unary RPCs are served".into());
    }
    let body = match rule.body.as_str() {
        "*" => true,
        "" => false,
        other => return Err(format!("body {other:?}: only \"*\" or none")),
    };
    let (segments, verb) =
        parse_template(&template).map_err(|problem| format!("{template}: {problem}"))?;
    let input = method.input();
    let mut path_fields = Vec::new();
    for segment in &segments {
        if let Segment::Field(name) = segment {
            let field = input
                .get_field_by_name(name)
                .filter(|field| field.kind() == Kind::String && !field.is_list())
                .ok_or_else(|| {
                    format!("{{{name}}} is not a string field of {}", input.full_name())
                })?;
            if path_fields.contains(&field) {
                return Err(format!("{{{name}}} bound twice"));
            }
            path_fields.push(field);
        }
    }
    let grpc_uri = format!("/{}/{}", method.parent_service().full_name(), method.name())
        .parse()
        .map_err(|error| format!("{error}"))?;
    Ok(Route {
        http_method,
        grpc_uri,
        template,
        segments,
        verb,
        body,
        method,
        path_fields,
    })
}

/// `/lit/{field}/lit:verb`. Only single-segment variables (`{field}`), no `*`, `**` or
/// `{field=pattern}`: idemd's routes need none of them.
fn parse_template(template: &str) -> Result<(Vec<Segment>, Option<String>), String> {
    let rest = template.strip_prefix('/').ok_or("must start with '/'")?;
    let last_slash = rest.rfind('/').map_or(0, |at| at + 1);
    let (rest, verb) = match rest[last_slash..].rfind(':') {
        Some(at) => {
            let at = last_slash + at;
            (&rest[..at], Some(rest[at + 1..].to_string()))
        }
        None => (rest, None),
    };
    if verb.as_deref().is_some_and(|verb| !is_literal(verb)) {
        return Err("the verb must be a literal".into());
    }
    let segments = rest
        .split('/')
        .map(|part| {
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "{{{name}}}: only {{field}} variables are supported"
                    ));
                }
                Ok(Segment::Field(name.to_string()))
            } else if is_literal(part) {
                Ok(Segment::Literal(part.to_string()))
            } else {
                Err(format!("segment {part:?} is not a literal or {{field}}"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((segments, verb))
}

fn is_literal(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn templates_parse() {
        let (segments, verb) =
            parse_template("/v1/namespaces/{namespace}/keys/{key}:acquire").expect("template");
        assert_eq!(
            segments,
            vec![
                Segment::Literal("v1".into()),
                Segment::Literal("namespaces".into()),
                Segment::Field("namespace".into()),
                Segment::Literal("keys".into()),
                Segment::Field("key".into()),
            ]
        );
        assert_eq!(verb.as_deref(), Some("acquire"));
        let (_, verb) = parse_template("/v1/admin/namespaces").expect("template");
        assert_eq!(verb, None);
        for bad in ["v1/x", "/v1/{a=*}", "/v1/**", "/v1//x", "/v1/{}", "/v1/x:"] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }

    fn method(pool: &DescriptorPool, service: &str, name: &str) -> MethodDescriptor {
        pool.get_service_by_name(service)
            .and_then(|service| service.methods().find(|method| method.name() == name))
            .expect("method")
    }

    #[test]
    fn rules_that_do_not_fit_the_descriptors_are_refused() {
        let pool = super::super::descriptor_pool().expect("pool");
        let acquire = method(&pool, "idempotency.v1.IdempotencyService", "Acquire");
        let rule = |post: &str| HttpRule {
            get: None,
            post: Some(post.into()),
            put: None,
            delete: None,
            patch: None,
            body: "*".into(),
        };
        for (template, why) in [
            ("/v1/{holdr}", "is not a string field"),
            ("/v1/{lease_ttl}", "is not a string field"),
            ("/v1/{key}/{key}", "bound twice"),
            ("/v1/{key=*}", "only {field} variables"),
        ] {
            let error = build(acquire.clone(), rule(template)).expect_err(template);
            assert!(error.contains(why), "{template}: {error}");
        }
        let mut two = rule("/v1/a");
        two.get = Some("/v1/b".into());
        assert!(build(acquire.clone(), two).is_err());
        let mut body = rule("/v1/a");
        body.body = "key".into();
        assert!(build(acquire, body).is_err());
    }

    /// The option is read as a whole `google.api.HttpRule`: the parts idemd does not serve are
    /// refused rather than dropped, so a route can never mean less than the proto says.
    #[test]
    fn http_rule_options_idemd_does_not_serve_are_refused() {
        let pool = super::super::descriptor_pool().expect("pool");
        let descriptor = pool
            .get_message_by_name("google.api.HttpRule")
            .expect("google.api.HttpRule in the pool");
        let rule = |fields: &[(&str, prost_reflect::Value)]| {
            let mut message = DynamicMessage::new(descriptor.clone());
            message.set_field_by_name("post", prost_reflect::Value::String("/v1/a".into()));
            for (name, value) in fields {
                message.set_field_by_name(name, value.clone());
            }
            HttpRule::from_message(&message)
        };
        let plain = rule(&[("body", prost_reflect::Value::String("*".into()))]).expect("plain");
        assert_eq!(plain.post.as_deref(), Some("/v1/a"));
        assert_eq!(plain.body, "*");
        let binding = prost_reflect::Value::Message(DynamicMessage::new(descriptor.clone()));
        for (name, value) in [
            ("selector", prost_reflect::Value::String("a.B.C".into())),
            ("response_body", prost_reflect::Value::String("x".into())),
            (
                "additional_bindings",
                prost_reflect::Value::List(vec![binding]),
            ),
        ] {
            assert!(rule(&[(name, value)]).is_err(), "{name}");
        }
    }

    /// An RPC of a served service without `option (google.api.http)` fails start: here every
    /// option is gone (prost_types keeps no extension when it decodes the descriptors).
    #[test]
    fn an_rpc_without_a_route_fails_start() {
        let set = prost_types::FileDescriptorSet::decode(crate::server::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let pool = DescriptorPool::from_file_descriptor_set(set).expect("pool");
        let error = load(&pool).expect_err("routes without options").to_string();
        assert!(
            error.contains("idempotency.v1.IdempotencyService.Acquire: has no HTTP route"),
            "{error}"
        );
    }

    #[test]
    fn shipped_protos_route_every_rpc_and_match_paths() {
        let pool = super::super::descriptor_pool().expect("pool");
        let routes = load(&pool).expect("routes");
        let mut table: Vec<String> = routes
            .iter()
            .map(|route| {
                format!(
                    "{} {} {}{}",
                    route.method.full_name(),
                    route.http_method,
                    route.template,
                    if route.body { " body=*" } else { "" }
                )
            })
            .collect();
        table.sort();
        let ns = "/v1/namespaces/{namespace}/keys/{key}";
        let admin = "/v1/admin/namespaces";
        let mut expected = vec![
            format!("idempotency.v1.IdempotencyService.Acquire POST {ns}:acquire body=*"),
            format!("idempotency.v1.IdempotencyService.Complete POST {ns}:complete body=*"),
            format!("idempotency.v1.IdempotencyService.Release POST {ns}:release body=*"),
            format!("idempotency.v1.IdempotencyService.Renew POST {ns}:renew body=*"),
            format!("idempotency.v1.IdempotencyService.Wait POST {ns}:wait body=*"),
            format!("idempotency.v1.IdempotencyService.Get GET {ns}"),
            format!("idempotency.admin.v1.AdminService.ListNamespaces GET {admin}"),
            format!("idempotency.admin.v1.AdminService.ListRecords GET {admin}/{{namespace}}/records"),
            format!("idempotency.admin.v1.AdminService.GetNamespaceStats GET {admin}/{{namespace}}/stats"),
            format!("idempotency.admin.v1.AdminService.ListAuditEntries GET {admin}/{{namespace}}/audit"),
            format!("idempotency.admin.v1.AdminService.PurgeRecord POST {admin}/{{namespace}}/records/{{key}}:purge body=*"),
            format!("idempotency.admin.v1.AdminService.ForceRelease POST {admin}/{{namespace}}/records/{{key}}:forceRelease body=*"),
            format!("idempotency.admin.v1.AdminService.PurgeRecords POST {admin}/{{namespace}}/records:purge body=*"),
        ];
        expected.sort();
        assert_eq!(table, expected);
        let acquire = routes
            .iter()
            .find(|route| route.method.name() == "Acquire")
            .expect("Acquire route");
        match acquire.match_path("/v1/namespaces/pay/keys/a:b%2Fc:acquire") {
            PathMatch::Fits(bound) => {
                let values: Vec<_> = bound.iter().map(|(_, raw)| raw.as_str()).collect();
                assert_eq!(values, ["pay", "a:b%2Fc"]);
            }
            PathMatch::NoMatch => panic!("no match"),
        }
        for other in [
            "/v1/namespaces/pay/keys/k:complete",
            "/v1/namespaces/pay/keys/k",
            "/v1/namespaces/pay/keys/k/x:acquire",
            "v1/namespaces/pay/keys/k:acquire",
        ] {
            assert!(
                matches!(acquire.match_path(other), PathMatch::NoMatch),
                "{other}"
            );
        }
    }
}
