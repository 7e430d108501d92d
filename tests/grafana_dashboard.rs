//! `deploy/grafana/resnet-serve.json` against the real binary: an importable Grafana dashboard
//! (schema, `${datasource}` variable, described panels that do not overlap) whose panels query
//! exactly the `resnet_*` metric families `GET /metrics` exports, by labels those metrics carry.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Width of Grafana's layout grid.
const GRID_COLUMNS: u64 = 24;

/// Labels Prometheus attaches when it scrapes, so they are never in `/metrics` itself.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// The dashboard as committed.
fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/resnet-serve.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// The dashboard's panels (it has no rows, so this is all of them).
fn panels(dashboard: &Value) -> &[Value] {
    dashboard["panels"].as_array().map_or(&[], Vec::as_slice)
}

/// Every target's PromQL in `panel`.
fn exprs(panel: &Value) -> impl Iterator<Item = &str> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|target| target["expr"].as_str())
}

/// A panel's cells on the grid.
#[derive(Clone, Copy, Debug)]
struct Rect {
    x: u64,
    y: u64,
    w: u64,
    h: u64,
}

impl Rect {
    fn of(panel: &Value) -> Option<Self> {
        let grid = &panel["gridPos"];
        Some(Self {
            x: grid["x"].as_u64()?,
            y: grid["y"].as_u64()?,
            w: grid["w"].as_u64()?,
            h: grid["h"].as_u64()?,
        })
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.x < other.x + other.w
            && other.x < self.x + self.w
            && self.y < other.y + other.h
            && other.y < self.y + self.h
    }
}

/// What would make Grafana refuse the model or render it badly, one line per problem.
fn dashboard_problems(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if dashboard["schemaVersion"].as_u64().is_none_or(|v| v < 39) {
        problems.push(format!(
            "schemaVersion {} is not 39 or later",
            dashboard["schemaVersion"]
        ));
    }
    for (pointer, expected) in [
        ("/uid", "resnet-serve"),
        ("/title", "resnet-serve"),
        ("/refresh", "10s"),
        ("/time/from", "now-1h"),
        ("/time/to", "now"),
    ] {
        let found = dashboard.pointer(pointer).unwrap_or(&Value::Null);
        if found != expected {
            problems.push(format!("{pointer} is {found}, not {expected:?}"));
        }
    }
    let has_variable = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| {
            v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
        });
    if !has_variable {
        problems.push("templating.list has no prometheus datasource variable `datasource`".into());
    }

    // Every query goes to the data source the viewer picks, never to one fixed at export time.
    let datasource = json!({"type": "prometheus", "uid": "${datasource}"});
    let panels = panels(dashboard);
    if panels.is_empty() {
        problems.push("no panels".into());
    }
    let mut ids = BTreeSet::new();
    let mut placed: Vec<(String, Rect)> = Vec::new();
    for (index, panel) in panels.iter().enumerate() {
        let name = match panel["title"].as_str() {
            Some(title) if !title.trim().is_empty() => format!("panel {title:?}"),
            _ => {
                problems.push(format!("panel #{index} has no title"));
                format!("panel #{index}")
            }
        };
        if panel["description"]
            .as_str()
            .is_none_or(|d| d.trim().is_empty())
        {
            problems.push(format!("{name} has no description"));
        }
        if !ids.insert(panel["id"].to_string()) {
            problems.push(format!("{name} repeats id {}", panel["id"]));
        }
        if panel["datasource"] != datasource {
            problems.push(format!(
                "{name} datasource is {}, not {datasource}",
                panel["datasource"]
            ));
        }
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        if targets.is_empty() {
            problems.push(format!("{name} has no targets"));
        }
        for target in targets {
            if target["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("{name} has a target without an expr: {target}"));
            }
            if !target["datasource"].is_null() && target["datasource"] != datasource {
                problems.push(format!(
                    "{name} has a target on datasource {}",
                    target["datasource"]
                ));
            }
        }
        match Rect::of(panel) {
            Some(rect) if rect.w > 0 && rect.h > 0 && rect.x + rect.w <= GRID_COLUMNS => {
                for (other, other_rect) in &placed {
                    if rect.overlaps(other_rect) {
                        problems.push(format!("{name} overlaps {other}"));
                    }
                }
                placed.push((name, rect));
            }
            _ => problems.push(format!(
                "{name} has no gridPos inside the {GRID_COLUMNS}-column grid: {}",
                panel["gridPos"]
            )),
        }
    }
    problems
}

/// Characters that continue a PromQL identifier, so `resnet_` after one is not a name's start.
fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The parts of `expr` outside string literals, each with its byte offset: names inside label
/// values (`route="..."`) are data, not references.
fn unquoted(expr: &str) -> Vec<(usize, &str)> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut chars = expr.char_indices();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            parts.push((start, &expr[start..i]));
            // Backquoted strings have no escapes; the others do. An unterminated string runs to
            // the end.
            let mut escaped = false;
            start = expr.len();
            for (j, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' && c != '`' {
                    escaped = true;
                } else if d == c {
                    start = j + 1;
                    break;
                }
            }
        }
    }
    if start < expr.len() {
        parts.push((start, &expr[start..]));
    }
    parts
}

/// The metric family a series name belongs to: a histogram's `_bucket`, `_sum` and `_count`
/// series are all under the name its `# TYPE` line gives.
fn family(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

/// The `resnet_*` metric families an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (_, part) in unquoted(expr) {
        for (i, _) in part.match_indices("resnet_") {
            if part[..i]
                .chars()
                .next_back()
                .is_some_and(is_identifier_char)
            {
                continue;
            }
            let rest = &part[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(family(&rest[..end]).to_owned());
        }
    }
    names
}

/// The label names an expression groups or joins by (`by (...)`, `on (...)`) or selects on
/// (`{label="..."}`).
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut text = String::new();
    // Blank out string literals so that only identifiers and punctuation are left.
    for (offset, part) in unquoted(expr) {
        text.push_str(&" ".repeat(offset - text.len()));
        text.push_str(part);
    }
    let identifiers = |list: &str| -> Vec<String> {
        list.split(|c: char| !is_identifier_char(c))
            .filter(|word| !word.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut rest = text.as_str();
    while let Some(i) = rest.find(['(', '{']) {
        let before = rest[..i].trim_end();
        let opener = rest.as_bytes()[i];
        let Some(close) = rest[i..].find(if opener == b'(' { ')' } else { '}' }) else {
            break;
        };
        let inside = &rest[i + 1..i + close];
        // `by (...)` groups and `on (...)` matches by the labels listed, so both need them.
        let is_grouping = ["by", "on"].iter().any(|keyword| {
            before
                .strip_suffix(keyword)
                .is_some_and(|head| !head.chars().next_back().is_some_and(is_identifier_char))
        });
        if opener == b'(' && is_grouping {
            labels.extend(identifiers(inside));
        } else if opener == b'{' {
            // In a selector the label names are the words before a matching operator.
            for matcher in inside.split(',') {
                if let Some(name) = matcher.split(['=', '!']).next() {
                    labels.extend(identifiers(name));
                }
            }
        }
        rest = &rest[i + 1..];
    }
    labels
}

/// The `resnet_*` metric families of a Prometheus text exposition (its `# TYPE` lines), each
/// with the label names its samples carry.
fn exported_metrics(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut families: BTreeMap<String, BTreeSet<String>> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| name.starts_with("resnet_"))
        .map(|name| (name.to_owned(), BTreeSet::new()))
        .collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let Some(labels) = families.get_mut(family(&line[..name_end])) else {
            continue;
        };
        if line[name_end..].starts_with('{') {
            labels.extend(label_names(&line[name_end..]));
        }
    }
    families
}

/// Panel titles by the metric families their queries read.
fn queried_metrics(dashboard: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut queried: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for name in exprs(panel).flat_map(metric_names) {
            queried.entry(name).or_default().insert(title.to_owned());
        }
    }
    queried
}

/// Where the dashboard and an exposition disagree: metrics queried and not exported, metrics
/// exported and not queried, labels a query uses that none of its exported metrics carry.
fn coverage_problems(
    dashboard: &Value,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let queried = queried_metrics(dashboard);
    for (name, titles) in &queried {
        if !exported.contains_key(name) {
            problems.push(format!(
                "{name} is queried by {titles:?} but /metrics has no `# TYPE {name}`"
            ));
        }
    }
    for name in exported.keys() {
        if !queried.contains_key(name) {
            problems.push(format!("{name} is exported but no panel queries it"));
        }
    }
    for panel in panels(dashboard) {
        for expr in exprs(panel) {
            let metrics: Vec<&BTreeSet<String>> = metric_names(expr)
                .iter()
                .filter_map(|name| exported.get(name))
                .collect();
            // A metric that is not exported at all is reported above.
            if metrics.is_empty() {
                continue;
            }
            for label in label_names(expr) {
                if !TARGET_LABELS.contains(&label.as_str())
                    && !metrics.iter().any(|labels| labels.contains(&label))
                {
                    problems.push(format!(
                        "panel {:?} uses label `{label}`, which no sample of {:?} carries",
                        panel["title"].as_str().unwrap_or_default(),
                        metric_names(expr)
                    ));
                }
            }
        }
    }
    problems
}

/// `serve` with the given weights on an ephemeral port, killed when dropped.
fn start_server(weights: &Path) -> common::JsonLogServer {
    let mut command = common::JsonLogServer::command();
    command
        .arg("--weights")
        .arg(weights)
        .env("RUST_LOG", "warn,resnet_serve=info");
    common::JsonLogServer::spawn(command)
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A small JPEG, so that the JPEG decoder path and its format label get samples too.
fn jpeg() -> Vec<u8> {
    let image = image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 2) as u8])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Jpeg)
        .unwrap();
    bytes.into_inner()
}

#[test]
fn the_dashboard_is_a_well_formed_grafana_model() {
    let problems = dashboard_problems(&dashboard());
    assert!(
        problems.is_empty(),
        "deploy/grafana/resnet-serve.json:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_dashboard_queries_exactly_the_metrics_the_server_exports() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let Some(cat) = common::shared_file("data/images/0000-cat.png") else {
        return;
    };
    let dashboard = dashboard();
    let queried = queried_metrics(&dashboard);
    let server = start_server(&weights);
    let http = client();
    // Histograms and labelled counters appear in /metrics only once they have a sample.
    for (content_type, body) in [
        ("image/png", std::fs::read(&cat).unwrap()),
        ("image/jpeg", jpeg()),
    ] {
        let response = http
            .post(server.url("/classify"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap();
        let status = response.status();
        assert_eq!(status, 200, "{content_type}: {}", response.text().unwrap());
    }
    // A sample may be recorded a moment after its answer went out: poll a little before
    // calling a queried metric missing.
    let deadline = Instant::now() + Duration::from_secs(5);
    let exported = loop {
        let text = http
            .get(server.url("/metrics"))
            .send()
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .unwrap();
        let exported = exported_metrics(&text);
        if queried.keys().all(|name| exported.contains_key(name)) || Instant::now() > deadline {
            break exported;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let problems = coverage_problems(&dashboard, &exported);
    assert!(
        problems.is_empty(),
        "the dashboard and /metrics disagree:\n{}",
        problems.join("\n")
    );
}

#[test]
fn metric_names_finds_families_outside_strings() {
    let names = |expr| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le) (rate(resnet_queue_wait_seconds_bucket[5m]))) \
             / sum(rate(resnet_batch_size_sum[1m])) / sum(rate(resnet_batch_size_count[1m]))"
        ),
        ["resnet_batch_size", "resnet_queue_wait_seconds"]
    );
    assert_eq!(
        names(r#"sum(rate(resnet_requests_total{route="resnet_fake", status!~'resnet_\'x'}[1m]))"#),
        ["resnet_requests_total"]
    );
    assert_eq!(names("my_resnet_total + vector(0)"), Vec::<String>::new());
    assert_eq!(names("resnet_images_total"), ["resnet_images_total"]);
}

#[test]
fn label_names_finds_grouping_and_matcher_labels() {
    let labels = |expr| label_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        labels(
            r#"sum by (route, le) (rate(resnet_x_bucket{status=~"4..", code!="a,b=c"}[1m])) / on (route) max(resnet_y{format="png"})"#
        ),
        ["code", "format", "le", "route", "status"]
    );
    assert_eq!(
        labels("sum(rate(nearby(resnet_x[1m])))"),
        Vec::<String>::new()
    );
}

#[test]
fn exported_metrics_reads_type_lines_and_sample_labels() {
    let text = "# HELP resnet_a_seconds a\n# TYPE resnet_a_seconds histogram\n\
                resnet_a_seconds_bucket{route=\"/x\",le=\"0.1\"} 1\n\
                resnet_a_seconds_sum{route=\"/x\"} 0.1\n\
                # TYPE resnet_b gauge\nresnet_b 0\n# TYPE other_total counter\nother_total 3\n";
    let exported = exported_metrics(text);
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        ["resnet_a_seconds", "resnet_b"]
    );
    assert_eq!(
        exported["resnet_a_seconds"].iter().collect::<Vec<_>>(),
        ["le", "route"]
    );
    assert!(exported["resnet_b"].is_empty());
}

/// The checks fail on a tampered copy of the dashboard and name what is wrong.
#[test]
fn a_tampered_dashboard_is_caught() {
    let original = dashboard();
    // What the committed dashboard reads, with the labels it uses, stands in for /metrics.
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for panel in panels(&original) {
        for expr in exprs(panel) {
            for name in metric_names(expr) {
                exported.entry(name).or_default().extend(label_names(expr));
            }
        }
    }
    assert_eq!(
        coverage_problems(&original, &exported),
        Vec::<String>::new()
    );

    let mut bogus = original.clone();
    let mut panel = panels(&original)[1].clone();
    panel["id"] = json!(999);
    panel["targets"][0]["expr"] = json!("sum by (shard) (rate(resnet_bogus_total[5m]))");
    panel["description"] = json!("");
    bogus["panels"].as_array_mut().unwrap().push(panel);
    let problems = coverage_problems(&bogus, &exported);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("resnet_bogus_total is queried"),
        "{problems:#?}"
    );
    let problems = dashboard_problems(&bogus);
    assert!(
        problems.iter().any(|p| p.ends_with("has no description")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("overlaps")),
        "{problems:#?}"
    );

    let mut wrong_label = original.clone();
    wrong_label["panels"][1]["targets"][0]["expr"] =
        json!("sum by (shard) (rate(resnet_requests_total[5m]))");
    let problems = coverage_problems(&wrong_label, &exported);
    assert!(
        problems.iter().any(|p| p.contains("label `shard`")),
        "{problems:#?}"
    );

    let mut short = original.clone();
    short["panels"]
        .as_array_mut()
        .unwrap()
        .retain(|p| !exprs(p).any(|e| e.contains("resnet_queue_depth")));
    let problems = coverage_problems(&short, &exported);
    assert_eq!(
        problems,
        ["resnet_queue_depth is exported but no panel queries it"]
    );

    let mut fixed_source = original.clone();
    fixed_source["panels"][0]["datasource"] =
        json!({"type": "prometheus", "uid": "P1809F7CD0C75ACF3"});
    fixed_source["schemaVersion"] = json!(27);
    let problems = dashboard_problems(&fixed_source);
    assert_eq!(problems.len(), 2, "{problems:#?}");
}
