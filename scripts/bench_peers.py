"""Forward-pass throughput of the CPU peers on the seed-random ResNet56: OpenVINO on the shared ONNX
file, PyTorch eager and PyTorch traced + frozen on the seed model with the seed weights.

    python scripts/bench_peers.py --engine openvino --threads 2 --seconds 3 1 64

Prints one JSON line per batch size in the form the shared ort_bench.py uses
({"engine", "batch_size", "images_per_second", "ms_per_batch"}), after one "check" line: before
timing anything, the engine classifies the first CHECK_IMAGES images of the shared CIFAR-10 subset
and its logits are compared with the shared PyTorch references (max |diff| <= 1e-3, same argmax),
so a figure is only printed for the same model computing the same function. Exits 1 when the
check fails.

Needs numpy and safetensors, plus openvino or torch for the engine asked for. Run by
scripts/bench-vs-onnxruntime.sh in the pinned environments it makes under target/.
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
from safetensors.numpy import load_file

SEED_MEAN = np.array([0.491, 0.482, 0.447], dtype=np.float32).reshape(1, 3, 1, 1)
SEED_STD = np.array([0.247, 0.243, 0.262], dtype=np.float32).reshape(1, 3, 1, 1)
TOLERANCE = 1e-3
# torch 2.x warns that TorchScript is deprecated in favour of torch.compile; it still works and is
# what "traced + frozen" means here.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
WARMUP = 5


def openvino_engine(shared, threads):
    """Returns (version, make_runner): make_runner(batch) compiles the ONNX model for that static
    batch with 2-thread, f32, single-stream latency settings and returns x -> logits."""
    import openvino as ov

    core = ov.Core()
    path = os.path.join(shared, "bench", "resnet56-seed-random.onnx")
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
    }

    def make_runner(batch):
        model = core.read_model(path)
        model.reshape([batch, 3, 32, 32])
        request = core.compile_model(model, "CPU", config).create_infer_request()

        def run(x):
            return request.infer({0: x})[0]

        return run

    return ov.__version__, make_runner


def torch_engine(shared, threads, traced):
    """Returns (version, make_runner) for the seed model in PyTorch: eager under inference_mode,
    or traced at the batch size, frozen and optimised for inference (oneDNN where it pays)."""
    import torch
    from safetensors.torch import load_file as load_torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    sys.path.insert(0, os.path.join(shared, "tools"))
    from seed_resnet56 import ResNet56

    model = ResNet56().eval()
    model.load_state_dict(load_torch(os.path.join(shared, "models", "resnet56-seed-random.safetensors")))

    def make_runner(batch):
        if traced:
            with torch.no_grad():
                module = torch.jit.trace(model, torch.zeros(batch, 3, 32, 32))
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))

            def run(x):
                with torch.no_grad():
                    return module(torch.from_numpy(x)).numpy()

        else:

            def run(x):
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).numpy()

        return run

    return torch.__version__, make_runner


def check(make_runner, shared, count):
    """Logits of the first `count` shared images against the PyTorch references."""
    images = load_file(os.path.join(shared, "data", "cifar10-test-846.safetensors"))["images"][:count]
    want = load_file(os.path.join(shared, "reference", "logits.safetensors"))["seed_random_logits"][:count]
    x = np.ascontiguousarray(((images.astype(np.float32) / 255.0) - SEED_MEAN) / SEED_STD, dtype=np.float32)
    got = np.asarray(make_runner(count)(x), dtype=np.float32)
    diff = float(np.abs(got - want).max())
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    return diff, agreement


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, choices=["openvino", "torch-eager", "torch-traced-frozen"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--shared", default=os.environ.get("RESNET_SHARED_DIR", "../shared"))
    ap.add_argument("--check-images", type=int, default=64)
    ap.add_argument("batch", type=int, nargs="+")
    a = ap.parse_args()

    if a.engine == "openvino":
        version, make_runner = openvino_engine(a.shared, a.threads)
    else:
        version, make_runner = torch_engine(a.shared, a.threads, traced=a.engine == "torch-traced-frozen")

    diff, agreement = check(make_runner, a.shared, a.check_images)
    ok = diff <= TOLERANCE and agreement == 1.0
    print(json.dumps({"engine": a.engine, "version": version, "check": {
        "images": a.check_images, "max_abs_diff": diff, "argmax_agreement": agreement, "ok": ok}}), flush=True)
    if not ok:
        print(f"{a.engine}: logits differ from the references (max |diff| {diff:.2e}, "
              f"argmax agreement {agreement:.4f})", file=sys.stderr)
        return 1

    for batch in a.batch:
        run = make_runner(batch)
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        for _ in range(WARMUP):
            run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            run(x)
            n += 1
        dt = time.perf_counter() - t0
        print(json.dumps({"engine": a.engine, "version": version, "threads": a.threads, "batch_size": batch,
                          "images_per_second": n * batch / dt, "ms_per_batch": dt * 1000 / n}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
