//! The gateway's routes, read at start from the `http` section of the service configs next to the
//! protos (`proto/**/*_http.yaml`, the shape of `google.api.Http`) and checked against the
//! descriptors: every rule names an RPC that exists, every path variable a string field of its
//! request, and every unary RPC of the served packages has a route.

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MethodDescriptor};
use serde::Deserialize;
use tonic::codegen::http::{Method, Uri};

/// The service configs compiled into idemd.
const CONFIGS: &[(&str, &str)] = &[
    (
        "proto/idempotency/v1/idempotency_http.yaml",
        include_str!("../../proto/idempotency/v1/idempotency_http.yaml"),
    ),
    (
        "proto/idempotency/admin/v1/admin_http.yaml",
        include_str!("../../proto/idempotency/admin/v1/admin_http.yaml"),
    ),
];

/// The services whose every RPC must have a route.
const SERVED: &[&str] = &[
    "idempotency.v1.IdempotencyService",
    "idempotency.admin.v1.AdminService",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceConfig {
    #[serde(rename = "type")]
    kind: String,
    config_version: u32,
    http: Http,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Http {
    rules: Vec<HttpRule>,
}

/// One `google.api.HttpRule` (without `custom` and `additional_bindings`, which idemd does not
/// use: a config that sets them fails to load).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRule {
    selector: String,
    get: Option<String>,
    post: Option<String>,
    put: Option<String>,
    delete: Option<String>,
    patch: Option<String>,
    #[serde(default)]
    body: String,
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

/// Why the routes could not be built (a defect of the shipped configs: idemd does not start).
#[derive(Debug, thiserror::Error)]
#[error("HTTP routes, {file}: {problem}")]
pub struct RouteError {
    file: &'static str,
    problem: String,
}

/// The routes of every shipped service config.
pub fn load(pool: &DescriptorPool) -> Result<Vec<Route>, RouteError> {
    let mut routes: Vec<Route> = Vec::new();
    for (file, text) in CONFIGS {
        let fail = |problem: String| RouteError { file, problem };
        let config: ServiceConfig =
            serde_norway::from_str(text).map_err(|error| fail(error.to_string()))?;
        if config.kind != "google.api.Service" || config.config_version != 3 {
            return Err(fail(
                "expected `type: google.api.Service` and `config_version: 3`".into(),
            ));
        }
        for rule in config.http.rules {
            let route = build(pool, rule).map_err(fail)?;
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
    for service in SERVED {
        let Some(service) = pool.get_service_by_name(service) else {
            return Err(RouteError {
                file: "descriptors",
                problem: format!("service {service} is missing"),
            });
        };
        for method in service.methods() {
            if !routes.iter().any(|route| route.method == method) {
                return Err(RouteError {
                    file: "descriptors",
                    problem: format!("{} has no HTTP route", method.full_name()),
                });
            }
        }
    }
    Ok(routes)
}

fn build(pool: &DescriptorPool, rule: HttpRule) -> Result<Route, String> {
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
        return Err(format!(
            "{}: exactly one of get, post, put, delete, patch",
            rule.selector
        ));
    };
    let (service, name) = rule
        .selector
        .rsplit_once('.')
        .ok_or_else(|| format!("{}: not a method's full name", rule.selector))?;
    let method = pool
        .get_service_by_name(service)
        .and_then(|service| service.methods().find(|method| method.name() == name))
        .ok_or_else(|| format!("{}: no such RPC", rule.selector))?;
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err(format!("{}: only unary RPCs are served", rule.selector));
    }
    let body = match rule.body.as_str() {
        "*" => true,
        "" => false,
        other => {
            return Err(format!(
                "{}: body {other:?}: only \"*\" or none",
                rule.selector
            ))
        }
    };
    let (segments, verb) = parse_template(&template)
        .map_err(|problem| format!("{}: {template}: {problem}", rule.selector))?;
    let input = method.input();
    let mut path_fields = Vec::new();
    for segment in &segments {
        if let Segment::Field(name) = segment {
            let field = input
                .get_field_by_name(name)
                .filter(|field| field.kind() == Kind::String && !field.is_list())
                .ok_or_else(|| {
                    format!(
                        "{}: {{{name}}} is not a string field of {}",
                        rule.selector,
                        input.full_name()
                    )
                })?;
            if path_fields.contains(&field) {
                return Err(format!("{}: {{{name}}} bound twice", rule.selector));
            }
            path_fields.push(field);
        }
    }
    let grpc_uri = format!("/{}/{}", method.parent_service().full_name(), method.name())
        .parse()
        .map_err(|error| format!("{}: {error}", rule.selector))?;
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

    #[test]
    fn rules_that_do_not_fit_the_descriptors_are_refused() {
        let pool = super::super::descriptor_pool().expect("pool");
        let rule = |selector: &str, post: &str| HttpRule {
            selector: selector.into(),
            get: None,
            post: Some(post.into()),
            put: None,
            delete: None,
            patch: None,
            body: "*".into(),
        };
        for (selector, template, why) in [
            (
                "idempotency.v1.IdempotencyService.Nope",
                "/v1/x",
                "no such RPC",
            ),
            (
                "idempotency.v1.IdempotencyService.Acquire",
                "/v1/{holdr}",
                "is not a string field",
            ),
            (
                "idempotency.v1.IdempotencyService.Acquire",
                "/v1/{lease_ttl}",
                "is not a string field",
            ),
            (
                "idempotency.v1.IdempotencyService.Acquire",
                "/v1/{key}/{key}",
                "bound twice",
            ),
            ("grpc.health.v1.Health.Watch", "/v1/health", "no such RPC"),
        ] {
            let error = build(&pool, rule(selector, template)).expect_err(template);
            assert!(error.contains(why), "{selector} {template}: {error}");
        }
        let mut two = rule("idempotency.v1.IdempotencyService.Get", "/v1/a");
        two.get = Some("/v1/b".into());
        assert!(build(&pool, two).is_err());
    }

    #[test]
    fn shipped_configs_cover_every_rpc_and_match_paths() {
        let pool = super::super::descriptor_pool().expect("pool");
        let routes = load(&pool).expect("routes");
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
