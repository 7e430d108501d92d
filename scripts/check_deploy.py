#!/usr/bin/env python3
"""Consistency checks of the deployment artefacts against the service and each other.

Run by scripts/validate-deploy.sh (inside its venv: needs PyYAML and kubernetes-validate).
Schema validation proper is done there by kubernetes-validate and check-jsonschema; this file
checks what no schema knows: probes on the service's routes, ports that agree, every RESNET_*
variable being one that src/config.rs reads (with a value it parses), drain timing, and the
Dockerfiles' build commands and runtime settings.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "kubernetes"
KSERVE_FILE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cuda"]
PORT = 8080
DEPLOYMENT_CONTAINER = "resnet-serve"
KSERVE_CONTAINER = "kserve-container"
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
    """RESNET_* variable -> Rust type of its field, from the clap attributes in src/config.rs."""
    source = (ROOT / "src" / "config.rs").read_text()
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
    report.check(ports == [PORT], f"{where}: serves on containerPort {PORT}", f"ports {ports}")
    env = env_map(main)
    if "RESNET_PORT" in env:
        report.check(
            env["RESNET_PORT"].get("value") == str(PORT),
            f"{where}: RESNET_PORT agrees with containerPort",
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

    service = objects.get("Service")
    if service:
        report.check(
            service["spec"]["selector"].items() <= pod_labels.items(),
            "Service selector matches the pod labels",
        )
        for port in service["spec"]["ports"]:
            report.check(
                resolve_port(port.get("targetPort", port["port"]), main) == PORT,
                f"Service port {port['port']} targets container port {PORT}",
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


def check_kserve(report: Report, versions: list[str]) -> list[tuple[str, dict]]:
    report.section("KServe InferenceService (deploy/kserve)")
    import kubernetes_validate

    docs = load_yaml_docs(KSERVE_FILE)
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
    report.check(
        env.get("PROTOCOL", {}).get("value") == "v2",
        f"{where}: declares the v2 (Open Inference) protocol (env PROTOCOL=v2)",
    )
    ports = [p["containerPort"] for p in main.get("ports", [])]
    report.check(ports == [PORT], f"{where}: serves on containerPort {PORT}", f"ports {ports}")
    if "RESNET_PORT" in env:
        report.check(
            env["RESNET_PORT"].get("value") == str(PORT),
            f"{where}: RESNET_PORT agrees with containerPort",
        )
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
    return [(rel(KSERVE_FILE), c) for c in containers]


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


def check_dockerfile(report: Report, path: Path, cuda: bool) -> list[tuple[str, str]]:
    """Returns the image's (name, value) ENV pairs for the env checks."""
    name = rel(path)
    report.section(f"{name}")
    instructions = dockerfile_instructions(path)
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    froms: list[str] = []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            froms.append(substitute(arguments.split()[0], global_args))
            stages.append([])
        elif not stages:
            if keyword == "ARG" and "=" in arguments:
                key, _, value = arguments.partition("=")
                global_args[key] = value
        else:
            stages[-1].append((keyword, arguments))
    if not report.check(len(froms) >= 2, "multi-stage build"):
        return []
    build, runtime = stages[0], stages[-1]
    build_runs = " ; ".join(a for k, a in build if k == "RUN")

    if cuda:
        build_ok = re.fullmatch(r"nvidia/cuda:12\.[0-9.]+-cudnn-devel-ubuntu(22|24)\.04", froms[0])
        report.check(bool(build_ok), f"build stage on nvidia/cuda 12.x cudnn-devel ({froms[0]})")
        expected_runtime = froms[0].replace("-cudnn-devel-", "-cudnn-runtime-")
        report.check(
            froms[-1] == expected_runtime,
            f"runtime stage on the matching cudnn-runtime image ({froms[-1]})",
        )
        command = "cargo build --release --locked --features cuda,cudnn"
        report.check(
            build_runs.count(command) == 2,
            f"dependency and crate builds both run `{command}`",
        )
        report.check(
            "rustup" in build_runs and "--profile minimal" in build_runs,
            "rustup installed with the minimal profile",
        )
        build_args = dict(a.partition("=")[::2] for k, a in build if k == "ARG" and "=" in a)
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
        builds = re.findall(r"cargo build[^;&|]*", build_runs)
        report.check(
            len(builds) == 2 and all(b.strip() == "cargo build --release --locked" for b in builds),
            "dependency and crate builds both run exactly `cargo build --release --locked`",
            f"found {builds}",
        )
    copies = [a for k, a in build if k == "COPY"]
    report.check(
        bool(copies) and copies[0] == "Cargo.toml Cargo.lock ./",
        "manifests copied before the sources (dependency layer cached)",
    )
    report.check(
        "fetch-weights --output" in build_runs
        and any(k == "ARG" and a.startswith("FETCH_WEIGHTS=") for k, a in build),
        "FETCH_WEIGHTS build arg runs `resnet-serve fetch-weights`",
    )

    users = [a for k, a in runtime if k == "USER"]
    report.check(
        bool(users) and users[-1].split(":")[0] not in {"0", "root"},
        f"runtime runs as a non-root user ({users[-1] if users else 'none'})",
    )
    report.check(
        any(k == "EXPOSE" and a.split("/")[0] == str(PORT) for k, a in runtime),
        f"EXPOSE {PORT}",
    )
    health = [a for k, a in runtime if k == "HEALTHCHECK"]
    report.check(
        bool(health) and "/health/live" in health[-1],
        "HEALTHCHECK probes /health/live",
    )
    runtime_runs = " ".join(a for k, a in runtime if k == "RUN")
    report.check(
        "curl" in runtime_runs and "ca-certificates" in runtime_runs,
        "runtime installs curl (for HEALTHCHECK) and ca-certificates",
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
    return env


def check_dockerignore(report: Report) -> None:
    report.section(".dockerignore")
    lines = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ["target", ".git", "weights/*.safetensors"]:
        report.check(needed in lines, f"excludes {needed}")
    for kept in ["src", "Cargo.toml", "Cargo.lock", "openapi.yaml"]:
        report.check(kept not in lines, f"keeps {kept} in the build context")


def check_variables(
    report: Report,
    config: dict[str, str],
    manifest_containers: list[tuple[str, dict]],
    dockerfile_env: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    report.section("RESNET_* variables against src/config.rs")
    report.check(len(config) >= 10, f"src/config.rs declares {len(config)} RESNET_* variables")
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
            f"{token} is read by src/config.rs",
            f'used in {", ".join(sorted(seen[token]))} but no flag has env = "{token}"',
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
        containers += check_kserve(report, versions)
        dockerfile_env = [
            (rel(path), check_dockerfile(report, path, cuda=path.name.endswith(".cuda")))
            for path in DOCKERFILES
        ]
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
