"""Helpers of scripts/gpu-check.sh (standard library, plus PyTorch for `torch`).

    gpu_check.py libs BINARY                  library directories the binary needs, ':'-joined
    gpu_check.py judge NAME [--min-accuracy A] reads `eval --json` on stdin, prints it as a check
    gpu_check.py torch --shared DIR ...        PyTorch on the same model: parity and forward timings
    gpu_check.py load --url URL ...            bounded HTTP load on loopback, one line per level
    gpu_check.py tag KEY=VALUE...              JSON lines on stdin with these fields added first
    gpu_check.py ready URL [--seconds S]       waits for URL to answer 200

Every result is one JSON line on stdout with a "check" field; progress goes to stderr.
"""

import argparse
import glob
import http.client
import json
import os
import site
import subprocess
import sys
import threading
import time
import urllib.parse

# Where the NVIDIA driver's libcuda.so.1 lives when the loader is not told already.
DRIVER_DIRS = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
               "/usr/lib/x86_64-linux-gnu/nvidia/current", "/usr/lib64"]

# The logit tolerance and accuracy floor of the shared references (shared/README.md).
MAX_LOGIT_DIFF = 1e-3


def emit(record):
    print(json.dumps(record), flush=True)


def log(message):
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


# --- libs ------------------------------------------------------------------------------------

def missing_libraries(binary, env):
    out = subprocess.run(["ldd", binary], env=env, capture_output=True, text=True, check=False)
    return sorted({line.split()[0] for line in out.stdout.splitlines() if "not found" in line})


def cmd_libs(args):
    """Directories holding the libraries the binary is linked to that the loader does not find:
    the CUDA 13 and cuDNN 9 ones from PyTorch's NVIDIA wheels first, then a system toolkit; the
    driver's libcuda.so.1 from where container runtimes mount it."""
    env = dict(os.environ)
    missing = missing_libraries(args.binary, env)
    roots = []
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        if os.path.isdir(root) and root not in roots:
            roots.append(root)
    dirs = []
    for name in missing:
        found = []
        for root in roots:
            found += glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True)
        found += glob.glob(os.path.join("/usr/local/cuda*", "lib*", name))
        found += glob.glob(os.path.join("/usr/local/cuda*", "targets", "*", "lib", name))
        # The driver's own library, where a container runtime mounts it.
        for directory in DRIVER_DIRS:
            found += glob.glob(os.path.join(directory, name))
        for path in found:
            directory = os.path.dirname(os.path.realpath(path))
            if "stubs" not in directory and directory not in dirs:
                dirs.append(directory)
                break
    path = ":".join(dirs + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
    env["LD_LIBRARY_PATH"] = path
    still = missing_libraries(args.binary, env)
    emit({"check": "libraries", "pass": not still, "added": dirs, "missing": still})
    if still:
        log(f"still missing after searching {roots}: {still}")
        return 1
    sys.stderr.write(path + "\n")
    with open(args.write, "w", encoding="utf-8") as f:
        f.write(path)
    return 0


# --- judge -----------------------------------------------------------------------------------

def cmd_judge(args):
    text = sys.stdin.read().strip()
    try:
        report = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        emit({"check": "eval", "weights": args.name, "label": args.label, "pass": False,
              "error": text[-2000:]})
        return 1
    failures = []
    if report.get("top1_agreement") != 1.0:
        failures.append("top1_agreement != 1.0")
    diff = report.get("max_abs_logit_diff")
    if diff is None or diff > MAX_LOGIT_DIFF:
        failures.append(f"max_abs_logit_diff > {MAX_LOGIT_DIFF}")
    if args.min_accuracy is not None and report.get("accuracy", 0.0) < args.min_accuracy:
        failures.append(f"accuracy < {args.min_accuracy}")
    if args.device and report.get("device") != args.device:
        failures.append(f"device != {args.device}")
    emit({"check": "eval", "weights": args.name, "label": args.label, "pass": not failures,
          "failures": failures, **report})
    return 1 if failures else 0


# --- torch -----------------------------------------------------------------------------------

def cmd_torch(args):
    import torch  # only this subcommand needs it

    sys.path.insert(0, os.path.join(args.shared, "tools"))
    from seed_resnet56 import ResNet56  # the seed notebook's model, as the references used

    device = torch.device(args.device)
    model = ResNet56()
    weights = os.path.join(args.shared, "models", "resnet56-seed-random.safetensors")
    try:
        from safetensors.torch import load_file
        state = load_file(weights)
    except ImportError:
        state = torch.load(weights.replace(".safetensors", ".pth"), map_location="cpu")
    model.load_state_dict(state)
    model.eval().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit({"check": "torch", "torch": torch.__version__, "cuda": torch.version.cuda,
          "cudnn": torch.backends.cudnn.version(), "device": name})

    # Parity of PyTorch itself on this device, for scale: its own GPU-vs-CPU logit differences.
    from safetensors.torch import load_file as load_tensors
    data = load_tensors(os.path.join(args.shared, "data", "cifar10-test-846.safetensors"))
    reference = load_tensors(os.path.join(args.shared, "reference", "logits.safetensors"))
    mean = torch.tensor([0.491, 0.482, 0.447]).view(1, 3, 1, 1)
    std = torch.tensor([0.247, 0.243, 0.262]).view(1, 3, 1, 1)
    images = (data["images"].float() / 255.0 - mean) / std
    want = reference["seed_random_logits"]

    def set_tf32(on):
        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cuda.matmul.allow_tf32 = on

    variants = [("eager", False, False)]
    if args.channels_last:
        variants.append(("channels-last+cudnn.benchmark", True, True))
    precisions = [("fp32", False)] + ([("tf32", True)] if args.tf32 and device.type == "cuda" else [])
    for precision, tf32 in precisions:
        set_tf32(tf32)
        with torch.inference_mode():
            got = torch.cat([model(images[i:i + 256].to(device)).cpu() for i in range(0, len(images), 256)])
        emit({"check": "torch-eval", "model": "seed-random", "precision": precision,
              "max_abs_logit_diff": float((got - want).abs().max()),
              "top1_agreement": float((got.argmax(1) == want.argmax(1)).float().mean())})

    for precision, tf32 in precisions:
        set_tf32(tf32)
        for variant, channels_last, benchmark in variants:
            torch.backends.cudnn.benchmark = benchmark
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            net = model.to(memory_format=fmt)
            for batch in args.batch_sizes:
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(batch, 3, 32, 32, generator=generator)
                # The same measure as `resnet-serve bench`: images from host memory, logits back.
                with torch.inference_mode():
                    def step():
                        return net(x.to(device).contiguous(memory_format=fmt)).cpu()
                    for _ in range(args.warmup):
                        step()
                    batches, started = 0, time.perf_counter()
                    while batches == 0 or time.perf_counter() - started < args.seconds:
                        step()
                        batches += 1
                    elapsed = time.perf_counter() - started
                emit({"check": "bench", "impl": f"pytorch-{variant}", "precision": precision,
                      "device": name, "batch_size": batch,
                      "images_per_second": batches * batch / elapsed,
                      "ms_per_batch": elapsed * 1000 / batches, "batches": batches})
    torch.backends.cudnn.benchmark = False
    set_tf32(False)
    return 0


# --- load ------------------------------------------------------------------------------------

def cmd_load(args):
    url = urllib.parse.urlsplit(args.url)
    status = 0
    with open(args.image, "rb") as f:
        body = f.read()
    for concurrency in args.levels:
        latencies, errors, lock = [], {}, threading.Lock()
        deadline = time.perf_counter() + args.seconds

        def client():
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            mine, bad = [], {}
            try:
                while time.perf_counter() < deadline and len(mine) < args.max_requests:
                    started = time.perf_counter()
                    try:
                        conn.request("POST", "/classify", body, {"Content-Type": "image/png"})
                        response = conn.getresponse()
                        response.read()
                        status = response.status
                    except (OSError, http.client.HTTPException) as e:
                        status = type(e).__name__
                        conn.close()
                        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
                    if status == 200:
                        mine.append(time.perf_counter() - started)
                    else:
                        bad[str(status)] = bad.get(str(status), 0) + 1
            finally:
                conn.close()
            with lock:
                latencies.extend(mine)
                for k, v in bad.items():
                    errors[k] = errors.get(k, 0) + v

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        latencies.sort()

        def quantile(q):
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None

        passed = bool(latencies) and not errors
        emit({"check": "load", "concurrency": concurrency, "seconds": elapsed, "ok": len(latencies),
              "errors": errors, "requests_per_second": len(latencies) / elapsed,
              "p50_ms": quantile(0.50), "p99_ms": quantile(0.99), "pass": passed})
        status = status or (0 if passed else 1)
    return status


# --- tag, ready ------------------------------------------------------------------------------

def cmd_tag(args):
    fields = dict(pair.split("=", 1) for pair in args.fields)
    status = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            emit({**fields, **json.loads(line)})
        except ValueError:
            emit({**fields, "pass": False, "error": line[-2000:]})
            status = 1
    return status


def cmd_ready(args):
    import urllib.request
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(args.url, timeout=2) as response:
                if response.status == 200:
                    return 0
        except OSError:
            pass
        time.sleep(0.1)
    log(f"{args.url} did not answer 200 within {args.seconds} s")
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("libs")
    p.add_argument("binary")
    p.add_argument("--write", required=True, help="file to write the library path to")
    p = sub.add_parser("judge")
    p.add_argument("name")
    p.add_argument("--label", default="")
    p.add_argument("--min-accuracy", type=float)
    p.add_argument("--device")
    p = sub.add_parser("torch")
    p.add_argument("--shared", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64, 256, 1024])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--tf32", action="store_true", help="also time with TF32 allowed")
    p = sub.add_parser("load")
    p.add_argument("--url", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--levels", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=100000, help="per client, a bound on top of --seconds")
    p = sub.add_parser("tag")
    p.add_argument("fields", nargs="*", metavar="KEY=VALUE")
    p = sub.add_parser("ready")
    p.add_argument("url")
    p.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()
    commands = {"libs": cmd_libs, "judge": cmd_judge, "torch": cmd_torch, "load": cmd_load,
                "tag": cmd_tag, "ready": cmd_ready}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
