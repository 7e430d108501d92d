#!/usr/bin/env python3
"""Checks of a running resnet-serve from outside, with the standard library only (used by
scripts/test-image.sh against the container image).

  image_checks.py ready    --port P [--timeout S]    wait for /health/ready to answer 200
  image_checks.py classify --port P --shared DIR     the 20 shared PNGs vs PyTorch's argmax
  image_checks.py sigterm  --port P --pid N          SIGTERM under load: every accepted request
                                                     answered, no other outcome than 200/503
"""

import argparse
import http.client
import json
import os
import pathlib
import signal
import struct
import sys
import threading
import time


def post_image(port, body, timeout=30.0):
    """One request on its own connection: (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/classify", body=body, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def ready(args):
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=2)
            conn.request("GET", "/health/ready")
            if conn.getresponse().status == 200:
                print(f"[image-checks] ready after {args.timeout - (deadline - time.monotonic()):.1f} s",
                      file=sys.stderr)
                return 0
        except OSError:
            pass
        time.sleep(0.2)
    print(f"[image-checks] /health/ready not 200 within {args.timeout} s", file=sys.stderr)
    return 1


def read_f32_tensor(path, name):
    """A float32 tensor of a safetensors file: (shape, flat list)."""
    raw = pathlib.Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    entry = header[name]
    if entry["dtype"] != "F32":
        raise ValueError(f"{name}: expected F32, got {entry['dtype']}")
    start, end = entry["data_offsets"]
    data = raw[8 + header_len + start : 8 + header_len + end]
    return entry["shape"], list(struct.unpack(f"<{len(data) // 4}f", data))


def classify(args):
    shared = pathlib.Path(args.shared)
    shape, logits = read_f32_tensor(shared / "reference/logits.safetensors", "paper_logits")
    classes = shape[1]
    images = sorted((shared / "data/images").glob("*.png"))
    if len(images) != 20:
        print(f"[image-checks] expected 20 PNGs in {shared}/data/images, found {len(images)}",
              file=sys.stderr)
        return 1
    wrong = []
    for path in images:
        index = int(path.name.split("-")[0])
        row = logits[index * classes : (index + 1) * classes]
        expected = max(range(classes), key=row.__getitem__)
        status, body = post_image(args.port, path.read_bytes())
        if status != 200 or body["class_index"] != expected:
            wrong.append(f"{path.name}: {status} {body}, PyTorch argmax {expected}")
    if wrong:
        print("[image-checks] disagreements with paper_logits:\n  " + "\n  ".join(wrong),
              file=sys.stderr)
        return 1
    print(f"[image-checks] {len(images)} PNGs: every prediction equals PyTorch's argmax",
          file=sys.stderr)
    return 0


def sigterm(args):
    """Clients post the cat PNG in a loop on fresh connections; once each has had answers, the
    server gets SIGTERM. Every answer must be 200, or 503 (shutting down) after it; a transport
    error is allowed only after SIGTERM, once the server stops accepting; and requests in flight
    at SIGTERM must have been answered 200."""
    body = (pathlib.Path(args.shared) / "data/images/0000-cat.png").read_bytes() \
        if args.shared else None
    if body is None:
        raise SystemExit("--shared is required")
    # `terminating` is set just before the signal and `signalled` just after it: a transport error
    # can be the signal's doing only if `terminating` was set when it was seen, and a request was
    # in flight across the signal if sent before `terminating` and answered after `signalled`.
    terminating = threading.Event()
    signalled = threading.Event()
    lock = threading.Lock()
    # (sent after terminating, ended after terminating, ended after signalled, status or error)
    outcomes = []

    def client():
        while True:
            sent_after = terminating.is_set()
            try:
                status, _ = post_image(args.port, body, timeout=60)
                outcome = status
            except (ConnectionError, http.client.RemoteDisconnected) as e:
                outcome = f"{type(e).__name__}: {e}"
            except OSError as e:
                outcome = f"{type(e).__name__}: {e}"
            answered_after = terminating.is_set()
            answered_after_signal = signalled.is_set()
            with lock:
                outcomes.append((sent_after, answered_after, answered_after_signal, outcome))
            if not isinstance(outcome, int) and answered_after:
                return

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while True:
        with lock:
            done = len(outcomes)
        if done >= 2 * args.clients:
            break
        if time.monotonic() > deadline:
            print("[image-checks] no load built up", file=sys.stderr)
            return 1
        time.sleep(0.01)
    terminating.set()
    os.kill(args.pid, signal.SIGTERM)
    signalled.set()
    for t in threads:
        t.join(timeout=90)
    if any(t.is_alive() for t in threads):
        print("[image-checks] a client never finished after SIGTERM", file=sys.stderr)
        return 1
    failures = []
    for sent_after, answered_after, _, outcome in outcomes:
        if outcome == 200:
            continue
        if not sent_after:
            # A transport error that came after SIGTERM, with no answer: the connection was
            # refused, or reset while still in the kernel's accept backlog when the listener
            # closed, so the server never accepted it (the criterion of tests/http_binary.rs).
            if answered_after and not isinstance(outcome, int):
                continue
            failures.append(f"sent before SIGTERM: {outcome}")
        elif outcome != 503 and isinstance(outcome, int):
            failures.append(f"sent after SIGTERM: status {outcome}")
    before = sum(1 for o in outcomes if not o[1])
    across = sum(1 for o in outcomes if not o[0] and o[2] and o[3] == 200)
    unaccepted = sum(1 for o in outcomes if o[1] and not isinstance(o[3], int))
    print(f"[image-checks] SIGTERM under {args.clients} clients: {before} answered before, "
          f"{across} in flight at SIGTERM answered 200, {unaccepted} refused or reset after it "
          f"(not accepted), {len(failures)} lost", file=sys.stderr)
    for f in failures[:10]:
        print(f"  {f}", file=sys.stderr)
    if across == 0:
        print("[image-checks] no request was in flight at SIGTERM", file=sys.stderr)
        return 1
    return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ready")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("classify")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--shared", required=True)
    p = sub.add_parser("sigterm")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--shared", required=True)
    p.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    return {"ready": ready, "classify": classify, "sigterm": sigterm}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
