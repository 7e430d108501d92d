//! `openapi.yaml` against the service: the same routes and methods as the router serves,
//! every `$ref` resolving, the error codes of `ApiError`, and the file served as it is.

mod common;
mod http_util;

use std::collections::BTreeSet;

use http_util::{client, fake_info, FakeModel, Gate, TestServer};
use resnet_serve::http::error::ApiError;
use resnet_serve::http::Endpoint;
use resnet_serve::server::ServerConfig;
use serde_yaml::Value;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// (METHOD, path) of every operation in the spec.
fn spec_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let paths = spec["paths"].as_mapping().expect("paths");
    let mut out = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().unwrap();
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if METHODS.contains(&method) {
                out.insert((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    out
}

#[test]
fn the_spec_and_the_router_have_the_same_routes() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let documented = spec_operations(&spec);
    let served: BTreeSet<(String, String)> = Endpoint::ALL
        .iter()
        .map(|e| (e.method().to_string(), e.path().to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml but not served: {unserved:?}"
    );

    // The running router answers every documented operation, and only those methods.
    let server = TestServer::start(
        FakeModel::new(Gate::open()),
        fake_info(10),
        ServerConfig::default(),
    );
    server.wait_ready();
    let http = client();
    for (method, path) in &documented {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        // Path parameters name the served model, so a 404 means the route is missing.
        let url = server.url(&path.replace("{model_name}", &fake_info(10).name));
        let status = http.request(method.clone(), &url).send().unwrap().status();
        assert!(
            status != 404 && status != 405,
            "{method} {path} is documented but answers {status}"
        );
        for other in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if documented.contains(&(other.to_owned(), path.clone())) {
                continue;
            }
            let other = reqwest::Method::from_bytes(other.as_bytes()).unwrap();
            let status = http.request(other.clone(), &url).send().unwrap().status();
            assert_eq!(status, 405, "{other} {path} is not documented");
        }
    }
    server.stop().unwrap();
}

#[test]
fn every_ref_resolves() {
    let spec = spec();
    let mut refs = Vec::new();
    collect_refs(&spec, &mut refs);
    assert!(refs.len() > 20);
    for r in refs {
        let pointer = r
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("external $ref {r}"));
        let mut node = &spec;
        for part in pointer.split('/') {
            node = &node[part];
        }
        assert!(!node.is_null(), "$ref {r} does not resolve");
    }
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                if k.as_str() == Some("$ref") {
                    out.push(v.as_str().unwrap().to_owned());
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn the_error_schema_lists_every_error_code() {
    let spec = spec();
    let documented: BTreeSet<&str> = spec["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let every_error = [
        ApiError::BadRequest(String::new()),
        ApiError::Unauthorized(String::new()),
        ApiError::NotFound(String::new()),
        ApiError::MethodNotAllowed {
            method: String::new(),
            path: String::new(),
            allowed: vec![],
        },
        ApiError::PayloadTooLarge(String::new()),
        ApiError::UnsupportedMediaType(String::new()),
        ApiError::InvalidImage(String::new()),
        ApiError::Overloaded { capacity: 1 },
        ApiError::NotReady,
        ApiError::ShuttingDown,
        ApiError::Timeout { ms: 1 },
        ApiError::Internal(String::new()),
    ];
    let codes: BTreeSet<&str> = every_error.iter().map(ApiError::code).collect();
    assert_eq!(codes, documented);
    // Each status the API uses is documented on the classify route.
    let responses = spec["paths"]["/classify"]["post"]["responses"]
        .as_mapping()
        .unwrap();
    for error in &every_error {
        let status = error.status().as_u16().to_string();
        if error.code() == "not_found" {
            continue;
        }
        assert!(
            responses.contains_key(Value::String(status.clone())),
            "/classify does not document {status}"
        );
    }
}

#[test]
fn the_served_spec_is_the_file() {
    let server = TestServer::start(
        FakeModel::new(Gate::open()),
        fake_info(10),
        ServerConfig::default(),
    );
    let r = client().get(server.url("/openapi.yaml")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert_eq!(r.text().unwrap(), text);
    server.stop().unwrap();
}
