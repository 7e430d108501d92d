"""A 12-megapixel JPEG through `POST /classify` against Pillow + torchvision preprocessing alone,
measured in one run, interleaved: run by scripts/bench-jpeg-vs-pillow.sh, which makes the venv
and starts the server.

    python bench_jpeg_vs_pillow.py --url http://127.0.0.1:PORT --image 12mp.jpg [--runs 15]

Prints each side's median and the ratio server / Pillow+torchvision; exits 1 above --max-ratio.
"""
import argparse
import http.client
import io
import json
import statistics
import sys
import time
import urllib.parse

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

# The seed notebook's normalisation; the values do not change the work done.
MEAN, STD = [0.491, 0.482, 0.447], [0.247, 0.243, 0.262]


def make_image(path, width, height):
    """A photo-like 4:2:0 JPEG: smooth shapes, edges and sensor-like noise, quality 90."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(xx - width * 0.4, yy - height * 0.6)
    arr = np.stack([
        128 + 100 * np.sin(xx / width * 9),
        np.where(r < height / 3, 210.0, 60.0) + yy * (40.0 / height),
        128 + 90 * np.cos((xx + yy) / 350.0),
    ], -1)
    arr += rng.normal(0, 8, arr.shape).astype(np.float32)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--make", action="store_true", help="write a 4000x3000 JPEG to --image first")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--max-ratio", type=float, default=1.0)
    a = ap.parse_args()
    if a.make:
        make_image(a.image, 4000, 3000)
    data = open(a.image, "rb").read()
    pipeline = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])

    url = urllib.parse.urlparse(a.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)

    def pillow_torchvision():
        t = time.perf_counter()
        x = pipeline(Image.open(io.BytesIO(data)).convert("RGB"))
        assert tuple(x.shape) == (3, 32, 32)
        return time.perf_counter() - t

    def classify():
        t = time.perf_counter()
        conn.request("POST", "/classify", body=data, headers={"Content-Type": "image/jpeg"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body[:200])
        json.loads(body)
        return time.perf_counter() - t

    # Warm-up, then interleaved so that both sides see the same machine.
    pillow_torchvision()
    classify()
    ours, theirs = [], []
    for _ in range(a.runs):
        theirs.append(pillow_torchvision())
        ours.append(classify())
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
    p, s = statistics.median(theirs), statistics.median(ours)
    print(f"image: {a.image}, {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP), {len(data)} bytes")
    print(f"Pillow {Image.__version__} + torchvision {torchvision.__version__} preprocessing: "
          f"median {p * 1000:.1f} ms (min {min(theirs) * 1000:.1f}) over {a.runs} runs")
    print(f"resnet-serve POST /classify (upload, decode, resize, forward pass, JSON): "
          f"median {s * 1000:.1f} ms (min {min(ours) * 1000:.1f}) over {a.runs} runs")
    ratio = s / p
    print(f"ratio /classify : Pillow+torchvision = {ratio:.2f}x (limit {a.max_ratio:.2f}x)")
    sys.exit(0 if ratio <= a.max_ratio else 1)


if __name__ == "__main__":
    main()
