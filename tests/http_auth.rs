//! Access control over HTTP against the fake model: the API key (open without one, 401 without
//! or with a wrong one, probes and the spec always open, metrics per flag, the key from a file
//! through the command line), and CORS (off by default, preflights answered when configured).

mod common;
mod http_util;

use clap::Parser;
use http_util::{client, error_code, fake_info, solid_png, FakeModel, Gate, TestServer};
use reqwest::blocking::multipart::{Form, Part};
use reqwest::blocking::RequestBuilder;
use reqwest::Method;
use resnet_serve::api_key::{ApiKey, KeyError};
use resnet_serve::cli::args::{Cli, Command};
use resnet_serve::http::auth::{AccessConfig, AccessError, AccessOptions};
use resnet_serve::http::cors::CorsOrigins;
use resnet_serve::server::ServerConfig;
use serde_json::Value;

const KEY: &str = "test-key-0123456789";

fn start(access: AccessConfig) -> TestServer {
    let server = TestServer::start(
        FakeModel::new(Gate::open()),
        fake_info(10),
        ServerConfig {
            access,
            ..ServerConfig::default()
        },
    );
    server.wait_ready();
    server
}

fn keyed(metrics_require_auth: bool) -> AccessConfig {
    AccessConfig {
        api_key: Some(ApiKey::new(KEY, "test").unwrap()),
        metrics_require_auth,
        ..AccessConfig::default()
    }
}

fn classify(server: &TestServer) -> RequestBuilder {
    client()
        .post(server.url("/classify"))
        .header("content-type", "image/png")
        .body(solid_png([1, 2, 3]))
}

fn classify_batch(server: &TestServer) -> RequestBuilder {
    let form = Form::new().part("image", Part::bytes(solid_png([4, 5, 6])));
    client().post(server.url("/classify/batch")).multipart(form)
}

/// Status, `WWW-Authenticate` and the JSON body's error code (or `-`).
fn outcome(request: RequestBuilder) -> (u16, Option<String>, String) {
    let r = request.send().unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let code = r
        .json::<Value>()
        .map_or_else(|_| "-".to_owned(), |b| error_code(&b).to_owned());
    (status, challenge, code)
}

fn assert_unauthorized(request: RequestBuilder, what: &str) {
    let (status, challenge, code) = outcome(request);
    assert_eq!((status, code.as_str()), (401, "unauthorized"), "{what}");
    let challenge = challenge.unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
}

fn get(server: &TestServer, path: &str) -> RequestBuilder {
    client().get(server.url(path))
}

#[test]
fn without_a_key_every_route_is_open() {
    let server = start(AccessConfig::default());
    for (what, request) in [
        ("classify", classify(&server)),
        ("batch", classify_batch(&server)),
        ("model", get(&server, "/v1/model")),
        ("metrics", get(&server, "/metrics")),
        ("a wrong key is ignored", classify(&server).bearer_auth("x")),
    ] {
        let (status, challenge, _) = outcome(request);
        assert_eq!((status, challenge), (200, None), "{what}");
    }
    server.stop().unwrap();
}

#[test]
fn with_a_key_protected_routes_need_it_and_probes_stay_open() {
    let server = start(keyed(false));
    let wrong_length = format!("{KEY}x");
    let wrong_byte = KEY.replace('9', "8");
    for (what, request) in [
        ("no header", classify(&server)),
        ("wrong key", classify(&server).bearer_auth(&wrong_byte)),
        ("longer key", classify(&server).bearer_auth(&wrong_length)),
        ("prefix", classify(&server).bearer_auth(&KEY[..5])),
        (
            "basic scheme",
            classify(&server).header("authorization", format!("Basic {KEY}")),
        ),
        ("bare key", classify(&server).header("authorization", KEY)),
        ("batch without key", classify_batch(&server)),
        ("model without key", get(&server, "/v1/model")),
        // Routes added later are protected without being listed.
        (
            "future v2 route",
            client().post(server.url("/v2/models/resnet56/infer")),
        ),
        ("unknown route", get(&server, "/nope")),
    ] {
        assert_unauthorized(request, what);
    }

    let r = classify(&server).bearer_auth(KEY).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["label"], "label9");
    let r = classify(&server)
        .header("authorization", format!("bearer {KEY}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "the scheme is case-insensitive");
    let r = classify_batch(&server).bearer_auth(KEY).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["results"][0]["class_index"], 9);
    assert_eq!(
        get(&server, "/v1/model")
            .bearer_auth(KEY)
            .send()
            .unwrap()
            .status(),
        200
    );
    // With the key, an unknown route is a 404 again.
    let (status, _, code) = outcome(get(&server, "/nope").bearer_auth(KEY));
    assert_eq!((status, code.as_str()), (404, "not_found"));

    for open in ["/health/live", "/health/ready", "/openapi.yaml", "/metrics"] {
        let (status, challenge, _) = outcome(get(&server, open));
        assert_eq!((status, challenge), (200, None), "{open}");
    }
    // Refusals are counted like any response.
    let metrics = server.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("resnet_requests_total{")
                && l.contains(r#"route="/classify""#)
                && l.contains(r#"status="401""#)),
        "{metrics}"
    );
    server.stop().unwrap();
}

#[test]
fn metrics_need_the_key_when_configured() {
    let server = start(keyed(true));
    assert_unauthorized(get(&server, "/metrics"), "metrics without key");
    let r = get(&server, "/metrics").bearer_auth(KEY).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap().contains("resnet_requests_total"));
    let (status, _, _) = outcome(get(&server, "/health/ready"));
    assert_eq!(status, 200);
    server.stop().unwrap();
}

fn serve_access(args: &[&str]) -> Result<AccessConfig, AccessError> {
    let cli =
        Cli::try_parse_from(std::iter::once("resnet-serve").chain(args.iter().copied())).unwrap();
    match cli.into_command() {
        Command::Serve(serve) => AccessConfig::from_options(&AccessOptions::from(&serve)),
        _ => unreachable!("no subcommand was given"),
    }
}

#[test]
fn the_key_can_come_from_a_mounted_file() {
    let dir = std::env::temp_dir().join(format!("resnet-http-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("api-key");
    std::fs::write(&file, format!("{KEY}\n")).unwrap();
    let path = file.to_str().unwrap();

    let access = serve_access(&["--api-key-file", path, "--metrics-require-auth"]).unwrap();
    assert!(access.metrics_require_auth);
    let server = start(access);
    assert_unauthorized(classify(&server), "no header");
    assert_unauthorized(
        classify(&server).bearer_auth(format!("{KEY} x")),
        "key and more",
    );
    assert_eq!(
        classify(&server).bearer_auth(KEY).send().unwrap().status(),
        200,
        "the trailing newline is not part of the key"
    );
    assert_unauthorized(get(&server, "/metrics"), "metrics");
    server.stop().unwrap();

    std::fs::write(&file, "").unwrap();
    assert!(matches!(
        serve_access(&["--api-key-file", path]),
        Err(AccessError::Key(KeyError::EmptyKey { .. }))
    ));
    assert!(matches!(
        serve_access(&["--api-key-file", dir.join("missing").to_str().unwrap()]),
        Err(AccessError::Key(KeyError::ReadKeyFile { .. }))
    ));
    let both = Cli::try_parse_from(["resnet-serve", "--api-key", KEY, "--api-key-file", path]);
    assert!(both.is_err(), "--api-key and --api-key-file together");
    assert!(serve_access(&[]).unwrap().api_key.is_none());

    // The binary stops before anything else, naming the problem.
    let (ok, _, stderr) = common::run_cli(&[
        "serve".as_ref(),
        "--api-key-file".as_ref(),
        file.as_os_str(),
        "--offline".as_ref(),
        "--weights".as_ref(),
        dir.join("no-weights.safetensors").as_os_str(),
    ]);
    assert!(!ok, "an empty key file must stop the server");
    assert!(
        stderr.contains("API key") && stderr.contains("empty"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn preflight(server: &TestServer, origin: &str) -> reqwest::blocking::Response {
    client()
        .request(Method::OPTIONS, server.url("/classify"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .unwrap()
}

fn allow_origin(r: &reqwest::blocking::Response) -> Option<&str> {
    r.headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

#[test]
fn cors_is_off_by_default() {
    let server = start(keyed(false));
    let r = preflight(&server, "https://app.example");
    assert_eq!(allow_origin(&r), None);
    let r = classify(&server)
        .bearer_auth(KEY)
        .header("origin", "https://app.example")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(allow_origin(&r), None);
    server.stop().unwrap();
}

#[test]
fn configured_origins_get_preflights_and_headers_even_with_a_key() {
    let server = start(AccessConfig {
        cors: CorsOrigins::parse("https://app.example, http://localhost:3000").unwrap(),
        ..keyed(false)
    });
    let r = preflight(&server, "https://app.example");
    assert_eq!(r.status(), 200, "a preflight carries no credentials");
    assert_eq!(allow_origin(&r), Some("https://app.example"));
    let allowed_headers = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    assert!(
        allowed_headers.contains("content-type"),
        "{allowed_headers}"
    );
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");

    let r = preflight(&server, "https://evil.example");
    assert_eq!(allow_origin(&r), None, "an origin not listed");

    let r = classify(&server)
        .bearer_auth(KEY)
        .header("origin", "http://localhost:3000")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(allow_origin(&r), Some("http://localhost:3000"));
    // A browser can read why it was refused.
    let r = classify(&server)
        .header("origin", "https://app.example")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(allow_origin(&r), Some("https://app.example"));
    server.stop().unwrap();

    let server = start(AccessConfig {
        cors: CorsOrigins::Any,
        ..AccessConfig::default()
    });
    let r = preflight(&server, "https://anywhere.example");
    assert_eq!(r.status(), 200);
    assert_eq!(allow_origin(&r), Some("*"));
    server.stop().unwrap();
}
