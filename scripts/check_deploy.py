#!/usr/bin/env python3
"""Consistency checks of the deployment artefacts against the service and each other.

Run by scripts/validate-deploy.sh (inside its venv: needs PyYAML and kubernetes-validate).
Schema validation proper is done there by kubernetes-validate and check-jsonschema; this file
checks what no schema knows: probes on the service's routes, ports that agree, every RESNET_*
variable being one that src/cli/args.rs reads (with a value it parses), drain timing, the
Dockerfiles' build commands and runtime settings, and what .dockerignore lets into the build.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "kubernetes"
KSERVE_FILE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
KSERVE_GRPC_FILE = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cuda"]
PORT = 8080
GRPC_PORT = 8081
DEPLOYMENT_CONTAINER = "resnet-serve"
KSERVE_CONTAINER = "kserve-container"
# The pretrained model the binary embeds, and its licence: both must reach the build.
EMBEDDED_WEIGHTS = "weights/resnet56-4bfd9763.safetensors"
EMBEDDED_LICENCE = "weights/LICENSE-resnet56-4bfd9763.txt"
# The one build command of both images; Dockerfile.cuda differs only in CARGO_FEATURES' default.
BUILD_COMMAND = 'cargo build --release --locked --features "${CARGO_FEATURES}"'
HEALTHCHECK = ["resnet-serve", "healthcheck"]
VAR_TOKEN = re.compile(r"\bRESNET_[A-Z0-9_]+\b")
# NAME=VALUE in prose and commands; a sentence's full stop or comma is not part of the value.
VAR_ASSIGNMENT = re.compile(r"\b(RESNET_[A-Z0-9_]+)=([^\s\"'`\\;,)]+?)\.?(?=[\s\"'`\\;,)]|$)")
# Values clap accepts for each Rust type behind a RESNET_* variable.
VALUE_RULES = {
    # Boolean flags use clap's BoolishValueParser.
    "bool": (r"true|false|1|0|yes|no|on|off", "true/false, 1/0, yes/no or on/off"),
    "u16": (r"[0-9]+", "an unsigned integer"),
    "u32": (r"[0-9]+", "an unsigned integer"),
    "u64": (r"[0-9]+", "an unsigned integer"),
    "usize": (r"[0-9]+", "an unsigned integer"),
    "DeviceChoice": (r"auto|cpu|cuda|cuda:[0-9]+", "auto, cpu, cuda or cuda:N"),
    "LogFormat": (r"text|json", "text or json"),
    "EngineChoice": (r"auto|fast|candle", "auto, fast or candle"),
    "SimdChoice": (r"auto|avx512|avx2|scalar", "auto, avx512, avx2 or scalar"),
}


class Report:
    def __init__(self) -> None:
        self.failures = 0
        self.passed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        """One check, printed with its outcome."""
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failures += 1
            print(f"  FAIL  {what}" + (f": {detail}" if detail else ""))
        return ok

    def section(self, title: str) -> None:
        print(f"\n{title}")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def config_variables() -> dict[str, str]:
    """RESNET_* variable -> Rust type of its field, from the clap attributes in src/cli/args.rs."""
    source = (ROOT / "src" / "cli" / "args.rs").read_text()
    pattern = re.compile(
        r'env\s*=\s*"(RESNET_[A-Z0-9_]+)"[^\]]*\]\s*pub\s+\w+\s*:\s*([A-Za-z0-9_:<>]+)'
    )
    return {name: rust_type.split("::")[-1] for name, rust_type in pattern.findall(source)}


def check_value(report: Report, config: dict[str, str], name: str, value: str, where: str) -> None:
    rust_type = config.get(name)
    if rust_type is None:
        return  # the unknown name is reported by the name check
    if rust_type == "IpAddr":
        try:
            ipaddress.ip_address(value)
            ok = True
        except ValueError:
            ok = False
        report.check(ok, f"{where}: {name}={value} is an IP address")
        return
    rule = VALUE_RULES.get(rust_type)
    if rule is None:
        return
    pattern, meaning = rule
    report.check(
        re.fullmatch(pattern, value) is not None,
        f"{where}: {name}={value} parses as {rust_type}",
        f"expected {meaning}",
    )


def runs_fetch_weights(container: dict) -> bool:
    words = list(container.get("command", [])) + list(container.get("args", []))
    return "fetch-weights" in words


def containers_of(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def env_map(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def resolve_port(port: object, container: dict) -> object:
    """A probe's or Service's port (number or name) as the container port number it reaches."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return declared["containerPort"]
    return port


def quantity_cores(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def check_probe(report: Report, where: str, container: dict, kind: str, paths: set[str]) -> None:
    probe = container.get(kind)
    if not report.check(probe is not None, f"{where}: {kind} is set"):
        return
    http = probe.get("httpGet", {})
    report.check(
        http.get("path") in paths,
        f"{where}: {kind} GETs {' or '.join(sorted(paths))}",
        f"path is {http.get('path')!r}",
    )
    report.check(
        resolve_port(http.get("port"), container) == PORT,
        f"{where}: {kind} port reaches {PORT}",
        f"port is {http.get('port')!r}",
    )


def check_kubernetes(report: Report) -> list[tuple[str, dict]]:
    """The plain Kubernetes manifests. Returns (file, container) pairs for the env checks."""
    report.section("Kubernetes manifests (deploy/kubernetes)")
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = kustomization.get("resources", [])
    present = sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    report.check(
        sorted(listed) == present,
        "kustomization.yaml lists exactly the manifests in the folder",
        f"listed {sorted(listed)}, present {present}",
    )

    objects: dict[str, dict] = {}
    for name in present:
        for doc in load_yaml_docs(K8S_DIR / name):
            objects[doc["kind"]] = doc
    for kind in ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]:
        report.check(kind in objects, f"a {kind} is defined")
    deployment = objects.get("Deployment")
    if deployment is None:
        return []

    name = deployment["metadata"]["name"]
    template = deployment["spec"]["template"]
    pod = template["spec"]
    pod_labels = template["metadata"].get("labels", {})
    selector = deployment["spec"]["selector"]["matchLabels"]
    report.check(
        selector.items() <= pod_labels.items(),
        "Deployment selector matches its pod labels",
    )
    containers = {c["name"]: c for c in pod["containers"]}
    main = containers.get(DEPLOYMENT_CONTAINER)
    if not report.check(main is not None, f"container {DEPLOYMENT_CONTAINER!r} exists"):
        return []
    where = f"Deployment/{name} {DEPLOYMENT_CONTAINER}"

    ports = [p["containerPort"] for p in main.get("ports", [])]
    report.check(
        ports == [PORT, GRPC_PORT],
        f"{where}: serves HTTP on containerPort {PORT} and gRPC on {GRPC_PORT}",
        f"ports {ports}",
    )
    env = env_map(main)
    for variable, port in [("RESNET_PORT", PORT), ("RESNET_GRPC_PORT", GRPC_PORT)]:
        report.check(
            env.get(variable, {}).get("value") == str(port),
            f"{where}: {variable} is set and agrees with containerPort {port}",
        )
    check_probe(report, where, main, "readinessProbe", {"/health/ready"})
    check_probe(report, where, main, "livenessProbe", {"/health/live"})
    check_probe(report, where, main, "startupProbe", {"/health/live", "/health/ready"})

    annotations = template["metadata"].get("annotations", {})
    expected = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }
    report.check(
        all(annotations.get(k) == v for k, v in expected.items()),
        "pod template carries the Prometheus scrape annotations for :8080/metrics",
        f"annotations {annotations}",
    )

    pre_stop = main.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    sleep_s = pre_stop.get("sleep", {}).get("seconds")
    if sleep_s is None and len(command) == 2 and command[0] == "sleep":
        sleep_s = int(command[1])
    report.check(sleep_s is not None and sleep_s > 0, f"{where}: preStop sleeps before SIGTERM")
    timeout_ms = int(env.get("RESNET_REQUEST_TIMEOUT_MS", {}).get("value", 10_000))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    needed = (sleep_s or 0) + timeout_ms / 1000
    report.check(
        grace > needed,
        f"terminationGracePeriodSeconds ({grace}) > preStop ({sleep_s}) + request timeout "
        f"({timeout_ms / 1000:g})",
    )

    security = pod.get("securityContext", {})
    report.check(security.get("runAsNonRoot") is True, "pod runs as non-root")
    for container in containers_of(pod):
        ctx = container.get("securityContext", {})
        cname = container["name"]
        report.check(
            ctx.get("readOnlyRootFilesystem") is True
            and ctx.get("allowPrivilegeEscalation") is False,
            f"container {cname}: read-only root filesystem, no privilege escalation",
        )
        resources = container.get("resources", {})
        report.check(
            bool(resources.get("requests")) and bool(resources.get("limits")),
            f"container {cname}: resource requests and limits set",
        )
    limits = main.get("resources", {}).get("limits", {})
    report.check(
        "cpu" in limits and quantity_cores(limits["cpu"]) == 2,
        f"{where}: sized for a 2-core pod (limits.cpu = 2)",
        f"limits {limits}",
    )
    weights = env.get("RESNET_WEIGHTS", {}).get("value")
    if weights:
        mounts = [m["mountPath"].rstrip("/") + "/" for m in main.get("volumeMounts", [])]
        report.check(
            any(weights.startswith(m) for m in mounts),
            f"{where}: RESNET_WEIGHTS ({weights}) lies on a mounted volume",
        )
    report.check(pod.get("enableServiceLinks") is False, "service links disabled")
    report.check(
        not any(runs_fetch_weights(c) for c in containers_of(pod)),
        f"Deployment/{name}: no container runs fetch-weights (the image embeds the model)",
    )

    service = objects.get("Service")
    if service:
        report.check(
            service["spec"]["selector"].items() <= pod_labels.items(),
            "Service selector matches the pod labels",
        )
        targets = {
            resolve_port(port.get("targetPort", port["port"]), main): port
            for port in service["spec"]["ports"]
        }
        report.check(
            sorted(targets) == [PORT, GRPC_PORT],
            f"Service ports target container ports {PORT} (HTTP) and {GRPC_PORT} (gRPC)",
            f"targets {sorted(targets, key=str)}",
        )
        report.check(
            targets.get(GRPC_PORT, {}).get("appProtocol") == "kubernetes.io/h2c",
            "Service's gRPC port declares appProtocol kubernetes.io/h2c (HTTP/2 without TLS)",
        )
    hpa = objects.get("HorizontalPodAutoscaler")
    if hpa:
        ref = hpa["spec"]["scaleTargetRef"]
        report.check(
            ref["kind"] == "Deployment" and ref["name"] == name,
            "HPA scales this Deployment",
        )
        report.check(
            hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"],
            "HPA minReplicas <= maxReplicas",
        )
    pdb = objects.get("PodDisruptionBudget")
    if pdb:
        report.check(
            pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(),
            "PodDisruptionBudget selector matches the pod labels",
        )

    images = {c["image"].rsplit(":", 1)[0] for c in containers_of(pod)}
    for entry in kustomization.get("images", []):
        report.check(
            entry["name"] in images,
            f"kustomization image override {entry['name']!r} names an image the manifests use",
        )
    return [(rel(K8S_DIR / "deployment.yaml"), c) for c in containers_of(pod)]


def check_grpc_probe(report: Report, where: str, container: dict, kind: str) -> None:
    probe = container.get(kind)
    if not report.check(probe is not None, f"{where}: {kind} is set"):
        return
    handler = probe.get("grpc") or probe.get("tcpSocket") or {}
    report.check(
        resolve_port(handler.get("port"), container) == GRPC_PORT,
        f"{where}: {kind} reaches the gRPC port {GRPC_PORT}",
        f"probe {probe}",
    )


def check_kserve(
    report: Report,
    versions: list[str],
    deployment_image: str | None,
    path: Path = KSERVE_FILE,
    grpc: bool = False,
) -> list[tuple[str, dict]]:
    report.section(f"KServe InferenceService ({rel(path)})")
    import kubernetes_validate

    docs = load_yaml_docs(path)
    report.check(len(docs) == 1, "one InferenceService in the file")
    isvc = docs[0]
    predictor = isvc["spec"]["predictor"]
    containers = predictor.get("containers", [])
    names = [c["name"] for c in containers]
    if not report.check(KSERVE_CONTAINER in names, f"predictor container is {KSERVE_CONTAINER!r}"):
        return []
    main = containers[names.index(KSERVE_CONTAINER)]
    where = f"InferenceService/{isvc['metadata']['name']}"
    env = env_map(main)
    # KServe's webhook takes PROTOCOL v1 or v2 only; the `h2c` port name makes it gRPC.
    protocol, port, port_name = ("v2", GRPC_PORT, "h2c") if grpc else ("v2", PORT, "http1")
    report.check(
        env.get("PROTOCOL", {}).get("value") == protocol,
        f"{where}: declares the Open Inference Protocol (env PROTOCOL={protocol})",
    )
    ports = [(p.get("name"), p["containerPort"]) for p in main.get("ports", [])]
    report.check(
        ports == [(port_name, port)],
        f"{where}: Knative routes containerPort {port} ({port_name})",
        f"ports {ports}",
    )
    for variable, expected in [("RESNET_PORT", PORT), ("RESNET_GRPC_PORT", GRPC_PORT)]:
        if variable in env or grpc:
            report.check(
                env.get(variable, {}).get("value") == str(expected),
                f"{where}: {variable} is {expected}",
            )
    report.check(
        deployment_image is not None and main.get("image") == deployment_image,
        f"{where}: runs the Deployment's image ({deployment_image})",
        f"image is {main.get('image')!r}",
    )
    report.check(
        not any(runs_fetch_weights(c) for c in containers),
        f"{where}: no container runs fetch-weights (the image embeds the model)",
    )
    if grpc:
        report.check(
            "grpc" in main.get("readinessProbe", {}),
            f"{where}: readiness is grpc.health.v1 (NOT_SERVING while draining)",
        )
        check_grpc_probe(report, where, main, "readinessProbe")
        check_grpc_probe(report, where, main, "livenessProbe")
    else:
        check_probe(report, where, main, "readinessProbe", {"/v2/health/ready"})
        check_probe(report, where, main, "livenessProbe", {"/v2/health/live"})
    annotations = predictor.get("annotations", {})
    report.check(
        annotations.get("prometheus.kserve.io/port") == str(PORT)
        and annotations.get("prometheus.kserve.io/path") == "/metrics",
        f"{where}: KServe Prometheus annotations point at :{PORT}/metrics",
    )

    # The CRD embeds core Container objects: validate them with the core schema too, strictly.
    for version in versions:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kserve-predictor-containers"},
            "spec": {"containers": containers},
        }
        try:
            kubernetes_validate.validate(pod, version, strict=True)
            report.check(True, f"{where}: containers valid as core/v1 Container (k8s {version})")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.caught.path)
            report.check(
                False,
                f"{where}: containers valid as core/v1 Container (k8s {version})",
                f"{path}: {error.caught.message}",
            )
    return [(rel(path), c) for c in containers]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def env_pairs(arguments: str) -> list[tuple[str, str]]:
    return re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", arguments)


@dataclass
class Dockerfile:
    """A Dockerfile's stages, as far as these checks need them."""

    path: Path
    froms: list[str]
    build: list[tuple[str, str]]
    runtime: list[tuple[str, str]]
    stage_names: list[str]

    def runs(self, stage: list[tuple[str, str]]) -> str:
        return " ; ".join(a for k, a in stage if k == "RUN")

    def args(self, stage: list[tuple[str, str]]) -> dict[str, str]:
        """A stage's ARG defaults, quotes removed."""
        pairs = (a.partition("=") for k, a in stage if k == "ARG")
        return {key: value.strip("\"'") for key, sep, value in pairs if sep}

    def cargo_builds(self) -> list[str]:
        """Every `cargo build ...` command of the build stage, as written."""
        return [b.strip() for b in re.findall(r"cargo build[^;&|]*", self.runs(self.build))]


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    froms: list[str] = []
    names: list[str] = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "FROM":
            words = arguments.split()
            froms.append(substitute(words[0], global_args))
            names.append(words[2] if len(words) >= 3 and words[1].upper() == "AS" else "")
            stages.append([])
        elif not stages:
            if keyword == "ARG" and "=" in arguments:
                key, _, value = arguments.partition("=")
                global_args[key] = value
        else:
            stages[-1].append((keyword, arguments))

    def stage(name: str, fallback: int) -> list[tuple[str, str]]:
        if name in names:
            return stages[names.index(name)]
        return stages[fallback] if stages else []

    return Dockerfile(path, froms, stage("build", 0), stage("runtime", -1), names)


def features_of(command: str, args: dict[str, str]) -> set[str]:
    """The cargo features a build command enables, ARG defaults substituted."""
    found = re.findall(r"--features[= ]\"?([^\"\s]*)\"?", substitute(command, args))
    return {f for group in found for f in re.split(r"[,\s]+", group) if f}


def healthcheck_command(runtime: list[tuple[str, str]]) -> list[str] | None:
    """The last HEALTHCHECK's exec-form command, or its shell form as [sh, -c, text]."""
    health = [a for k, a in runtime if k == "HEALTHCHECK"]
    if not health:
        return None
    _, cmd, rest = health[-1].partition("CMD ")
    if not cmd:
        return None
    rest = rest.strip()
    try:
        parsed = json.loads(rest)
    except json.JSONDecodeError:
        return ["/bin/sh", "-c", rest]
    return parsed if isinstance(parsed, list) else None


def check_dockerfile(report: Report, path: Path, cuda: bool) -> list[tuple[str, str]]:
    """Returns the image's (name, value) ENV pairs for the env checks.

    The CUDA image is held to the CPU image's facts too (healthcheck, no apt in the runtime,
    licence, debug symbols). The build command the two share is compared by
    check_dockerfiles_agree.
    """
    name = rel(path)
    report.section(f"{name}")
    df = parse_dockerfile(path)
    froms, build, runtime = df.froms, df.build, df.runtime
    if not report.check(len(froms) >= 2, "multi-stage build"):
        return []
    build_runs = df.runs(build)
    build_args = df.args(build)
    builds = df.cargo_builds()

    # Facts of the CPU image that the CUDA image follows too.
    def image_fact(ok: bool, what: str, detail: str = "") -> None:
        report.check(ok, what, detail)

    report.check(
        bool(builds) and all(re.match(r"cargo build --release --locked\b", b) for b in builds),
        "every cargo build in the build stage is `cargo build --release --locked ...`",
        f"found {builds}",
    )
    if cuda:
        build_ok = re.fullmatch(r"nvidia/cuda:12\.[0-9.]+-cudnn-devel-ubuntu(22|24)\.04", froms[0])
        report.check(bool(build_ok), f"build stage on nvidia/cuda 12.x cudnn-devel ({froms[0]})")
        expected_runtime = froms[0].replace("-cudnn-devel-", "-cudnn-runtime-")
        report.check(
            froms[-1] == expected_runtime,
            f"runtime stage on the matching cudnn-runtime image ({froms[-1]})",
        )
        enabled = [features_of(b, build_args) for b in builds]
        report.check(
            bool(enabled) and all({"cuda", "cudnn"} <= f for f in enabled),
            "every cargo build enables the cuda and cudnn features (ARG defaults applied)",
            f"features {[sorted(f) for f in enabled]}",
        )
        report.check(
            "rustup" in build_runs and "--profile minimal" in build_runs,
            "rustup installed with the minimal profile",
        )
        report.check(
            build_args.get("CUDA_COMPUTE_CAP") == "90",
            "CUDA_COMPUTE_CAP is a build arg defaulting to 90 (H100/H200)",
        )
        build_env = dict(p for k, a in build if k == "ENV" for p in env_pairs(a))
        report.check(
            build_env.get("CUDA_COMPUTE_CAP") == "${CUDA_COMPUTE_CAP}",
            "CUDA_COMPUTE_CAP reaches the build's environment",
        )
        features = tomllib.loads((ROOT / "Cargo.toml").read_text()).get("features", {})
        report.check(
            "cuda" in features and "cudnn" in features,
            "Cargo.toml defines the cuda and cudnn features",
        )
    else:
        report.check(
            re.fullmatch(r"rust:[0-9.]+-[a-z]+", froms[0]) is not None,
            f"build stage on a pinned official rust image ({froms[0]})",
        )
        report.check(
            froms[-1] == "debian:bookworm-slim",
            f"runtime stage on debian:bookworm-slim ({froms[-1]})",
        )
        report.check(
            froms[0].endswith("-bookworm"),
            "build and runtime share the Debian release (glibc)",
        )
        report.check(
            builds == [BUILD_COMMAND],
            f"the build stage runs exactly one `{BUILD_COMMAND}`",
            f"found {builds}",
        )
        report.check(
            "CARGO_FEATURES" in build_args and build_args["CARGO_FEATURES"] == "",
            "CARGO_FEATURES is a build arg defaulting to none (default features: embedded model)",
            f"build args {build_args}",
        )

    # Dependencies must not recompile on every source edit: either the manifests are copied and
    # built before the sources (a cached layer), or cargo's registry and target directory are
    # cache mounts of the RUN that builds.
    workdir = next((a for k, a in reversed(build) if k == "WORKDIR"), "/")
    copies = [a for k, a in build if k == "COPY"]
    layer_cached = bool(copies) and copies[0] == "Cargo.toml Cargo.lock ./"
    mounted = {
        m
        for k, a in build
        if k == "RUN" and "cargo build" in a
        for m in re.findall(r"--mount=type=cache\S*?,target=(\S+)", a)
    }
    mount_cached = "/usr/local/cargo/registry" in mounted and (
        f"{workdir.rstrip('/')}/target" in mounted
    )
    report.check(
        layer_cached or mount_cached,
        "dependencies cached across source edits (a manifests-first layer, or cache mounts "
        f"for the cargo registry and {workdir.rstrip('/')}/target)",
        f"first COPY {copies[:1]}, cache mounts {sorted(mounted)}",
    )
    image_fact(
        "debug-symbols" in df.stage_names
        and "objcopy --only-keep-debug" in build_runs
        and "--strip-all" in build_runs,
        "the binary ships stripped, its debug info kept in a debug-symbols stage",
    )
    image_fact(
        not any(k == "ARG" and a.startswith("FETCH_WEIGHTS") for k, a in build)
        and "fetch-weights" not in build_runs,
        "no FETCH_WEIGHTS build arg and no fetch-weights run (the binary embeds the model)",
    )

    users = [a for k, a in runtime if k == "USER"]
    report.check(
        bool(users) and users[-1].split(":")[0] not in {"0", "root"},
        f"runtime runs as a non-root user ({users[-1] if users else 'none'})",
    )
    report.check(
        any(
            k == "EXPOSE" and [p.split("/")[0] for p in a.split()] == [str(PORT), str(GRPC_PORT)]
            for k, a in runtime
        ),
        f"EXPOSE {PORT} {GRPC_PORT}",
    )
    runtime_runs = " ; ".join(a for k, a in runtime if k == "RUN")
    installs = re.search(r"\bapt(-get)?\s+install\b", runtime_runs) is not None
    health = healthcheck_command(runtime)
    own_check = health == HEALTHCHECK
    curl_check = (
        health is not None
        and "/health/live" in " ".join(health)
        and "curl" in " ".join(health)
        and installs
        and "curl" in runtime_runs
    )
    report.check(
        own_check or curl_check,
        "HEALTHCHECK probes /health/live with a command the image has "
        "(`resnet-serve healthcheck`, or curl installed by the runtime stage)",
        f"HEALTHCHECK {health}",
    )
    image_fact(
        own_check,
        'HEALTHCHECK CMD ["resnet-serve", "healthcheck"]',
        f"HEALTHCHECK {health}",
    )
    image_fact(
        not installs and "curl" not in runtime_runs,
        "the runtime stage installs nothing with apt (no curl, no ca-certificates)",
    )
    labels = " ".join(a for k, a in runtime if k == "LABEL")
    image_fact(
        any(k == "COPY" and a.split()[0] == EMBEDDED_LICENCE for k, a in runtime)
        and "BSD-2-Clause" in labels,
        f"the runtime ships {EMBEDDED_LICENCE} and its licenses label names BSD-2-Clause",
    )
    entry = [a for k, a in runtime if k == "ENTRYPOINT"]
    cmd = [a for k, a in runtime if k == "CMD"]
    report.check(
        bool(entry) and json.loads(entry[-1]) == ["resnet-serve"],
        'ENTRYPOINT ["resnet-serve"]',
    )
    report.check(bool(cmd) and json.loads(cmd[-1]) == ["serve"], 'CMD ["serve"]')
    env = [p for k, a in runtime if k == "ENV" for p in env_pairs(a)]
    values = dict(env)
    report.check(values.get("RESNET_HOST") == "0.0.0.0", "ENV RESNET_HOST=0.0.0.0")
    report.check(values.get("RESNET_PORT") == str(PORT), f"ENV RESNET_PORT={PORT}")
    device = "cuda" if cuda else "cpu"
    report.check(values.get("RESNET_DEVICE") == device, f"ENV RESNET_DEVICE={device}")
    report.check(
        "RESNET_WEIGHTS" not in values,
        "ENV sets no RESNET_WEIGHTS (embedded model unless a file is mounted or named)",
    )
    return env


def check_dockerfiles_agree(report: Report) -> None:
    """The two images build the crate with the same command; only CARGO_FEATURES differs."""
    report.section("Dockerfile and Dockerfile.cuda")
    cpu, gpu = (parse_dockerfile(path).cargo_builds() for path in DOCKERFILES)
    report.check(
        gpu == cpu,
        "Dockerfile.cuda's build stage runs the same cargo build command(s) as Dockerfile's",
        f"Dockerfile {cpu}, Dockerfile.cuda {gpu}",
    )


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-includes, regex) per .dockerignore line, in order, with Docker's matching rules:
    `*` and `?` stay within a path segment, `**` spans segments, a leading `/` is dropped."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negate, re.compile(regex)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path` (relative to the context): the last rule matching the path or
    one of its parent directories decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def check_dockerignore(report: Report) -> None:
    report.section(".dockerignore")
    rules = dockerignore_patterns()
    excluded = [
        "target/release/resnet-serve",
        ".git/HEAD",
        "weights/resnet56.safetensors",
        "weights/resnet20.safetensors",
        "models/other.safetensors",
        "weights/resnet56-4bfd9763.th",
        "weights/model.pth",
    ]
    for path in excluded:
        report.check(not in_build_context(path, rules), f"keeps {path} out of the build context")
    kept = [
        EMBEDDED_WEIGHTS,
        EMBEDDED_LICENCE,
        "src/main.rs",
        "Cargo.toml",
        "Cargo.lock",
        "openapi.yaml",
    ]
    for path in kept:
        report.check(in_build_context(path, rules), f"lets {path} into the build context")
    for dockerfile in DOCKERFILES:
        df = parse_dockerfile(dockerfile)
        for keyword, arguments in df.build + df.runtime:
            words = arguments.split()
            if keyword != "COPY" or any(w.startswith("--from") for w in words):
                continue
            for source in [w for w in words[:-1] if not w.startswith("--") and w != "."]:
                report.check(
                    in_build_context(source, rules),
                    f"{rel(dockerfile)}: COPY source {source} is in the build context",
                )


def check_variables(
    report: Report,
    config: dict[str, str],
    manifest_containers: list[tuple[str, dict]],
    dockerfile_env: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    report.section("RESNET_* variables against src/cli/args.rs")
    report.check(len(config) >= 10, f"src/cli/args.rs declares {len(config)} RESNET_* variables")
    scanned = DOCKERFILES + sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
    seen: dict[str, set[str]] = {}
    for path in scanned:
        text = path.read_text()
        for token in VAR_TOKEN.findall(text):
            seen.setdefault(token, set()).add(rel(path))
        for name, value in VAR_ASSIGNMENT.findall(text):
            check_value(report, config, name, value, rel(path))
    for token in sorted(seen):
        report.check(
            token in config,
            f"{token} is read by src/cli/args.rs",
            f'used in {", ".join(sorted(seen[token]))} but no flag has env = "{token}"',
        )
    # `serve` never downloads: RESNET_OFFLINE is accepted for old configurations, with a warning.
    offline = [
        f"{where} {container['name']}"
        for where, container in manifest_containers
        if "RESNET_OFFLINE" in env_map(container)
    ] + [f"{where} ENV" for where, pairs in dockerfile_env if "RESNET_OFFLINE" in dict(pairs)]
    report.check(
        not offline,
        "RESNET_OFFLINE (a no-op that logs a warning) is set by no manifest or image",
        f"set in {', '.join(offline)}",
    )
    for where, container in manifest_containers:
        for entry in container.get("env", []):
            if entry["name"].startswith("RESNET_") and "value" in entry:
                check_value(
                    report, config, entry["name"], entry["value"], f"{where} {container['name']}"
                )
    for where, pairs in dockerfile_env:
        for name, value in pairs:
            if name.startswith("RESNET_"):
                check_value(report, config, name, value.strip('"'), f"{where} ENV")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--k8s-version",
        action="append",
        default=[],
        help="Kubernetes version for the core-schema check of the KServe containers",
    )
    args = parser.parse_args()
    versions = args.k8s_version or ["1.30.0"]

    report = Report()
    try:
        config = config_variables()
        containers = check_kubernetes(report)
        deployment_image = next(
            (c["image"] for w, c in containers if c["name"] == DEPLOYMENT_CONTAINER), None
        )
        containers += check_kserve(report, versions, deployment_image)
        containers += check_kserve(
            report, versions, deployment_image, path=KSERVE_GRPC_FILE, grpc=True
        )
        dockerfile_env = [
            (rel(path), check_dockerfile(report, path, cuda=path.name.endswith(".cuda")))
            for path in DOCKERFILES
        ]
        check_dockerfiles_agree(report)
        check_dockerignore(report)
        check_variables(report, config, containers, dockerfile_env)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, yaml.YAMLError) as error:
        # A manifest without the structure these checks expect: say so instead of a traceback.
        report.check(
            False, "artefacts have the expected structure", f"{type(error).__name__}: {error}"
        )
    print(f"\n{report.passed} passed, {report.failures} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
