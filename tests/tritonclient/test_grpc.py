"""The Open Inference Protocol over gRPC, driven by Triton's own client (tritonclient[grpc]) and
by the protocol's messages directly (typed contents, which tritonclient never sends), plus the
standard grpc.health.v1 service as Kubernetes gRPC probes call it (grpcio-health-checking).

Needs RESNET_GRPC_URL (host:port of the gRPC API of a server running the seed-random weights),
RESNET_BIN and RESNET_WEIGHTS (to start servers of its own: with an API key, small limits, and
one to stop), and RESNET_SHARED_DIR; scripts/test-tritonclient.sh provides them.
"""

import os
import signal
import socket
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from test_v2 import assert_matches, data, normalised, png, softmax  # noqa: F401 (fixture)

URL = os.environ["RESNET_GRPC_URL"]
BIN = os.environ["RESNET_BIN"]
WEIGHTS = os.environ["RESNET_WEIGHTS"]
KEY = "grpc-test-key"
MODEL = "resnet56"


@pytest.fixture(scope="module")
def client():
    c = grpcclient.InferenceServerClient(url=URL)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub():
    channel = grpc.insecure_channel(URL)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


class Server:
    """A server of the test's own on free ports, with `args` added; ready when constructed."""

    def __init__(self, *args):
        self.http, self.grpc = free_port(), free_port()
        self.process = subprocess.Popen(
            [BIN, "serve", "--weights", WEIGHTS, "--host", "127.0.0.1",
             "--port", str(self.http), "--grpc-port", str(self.grpc), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("RESNET_")},
        )
        self.url = f"127.0.0.1:{self.grpc}"
        self.channel = grpc.insecure_channel(self.url)
        deadline = time.monotonic() + 60
        while True:
            try:
                if health(self.channel) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "the server never reported SERVING"
            time.sleep(0.05)

    def stop(self):
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def pixels_request(x, model=MODEL):
    request = service_pb2.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def fp32_input(x):
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"input": ("FP32", ["-1", "3", "32", "32"]), "image_bytes": ("BYTES", ["-1"])}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {"logits": ("FP32", ["-1", "10"]), "probabilities": ("FP32", ["-1", "10"])}
    assert client.get_server_metadata(as_json=True)["name"] == "resnet-serve"
    channel = grpc.insecure_channel(URL)
    for service in ["", "inference.GRPCInferenceService"]:
        assert health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health(channel, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_fp32_raw_infer_matches_pytorch(client, data):
    images, reference = data
    picks = np.arange(3, 846, 53)[:16]
    x = normalised(images[picks])
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("logits", "probabilities")]
    result = client.infer(MODEL, [fp32_input(x)], outputs=outputs, request_id="g-7")
    logits = result.as_numpy("logits")
    assert_matches(logits, reference[picks])
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(logits), atol=1e-6)
    assert result.get_response().id == "g-7"


def test_default_outputs_are_both_in_order(client, data):
    images, reference = data
    result = client.infer(MODEL, [fp32_input(normalised(images[[845]]))])
    assert [o.name for o in result.get_response().outputs] == ["logits", "probabilities"]
    assert_matches(result.as_numpy("logits"), reference[[845]])


def test_fp32_typed_contents_match_pytorch(stub, data):
    images, reference = data
    picks = np.array([0, 400, 845])
    response = stub.ModelInfer(pixels_request(normalised(images[picks])), timeout=60)
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["logits", "probabilities"]
    assert list(response.outputs[0].shape) == [3, 10]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    assert_matches(logits, reference[picks])


def test_bytes_input_raw_and_typed_match_pytorch(client, stub, data):
    images, reference = data
    picks = np.array([5, 6, 7, 8])
    pngs = [png(images[i]) for i in picks]
    raw = grpcclient.InferInput("image_bytes", [len(pngs)], "BYTES")
    raw.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    result = client.infer(MODEL, [raw], outputs=[grpcclient.InferRequestedOutput("logits")])
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    assert_matches(result.as_numpy("logits"), reference[picks])

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image_bytes", datatype="BYTES", shape=[len(pngs)])
    tensor.contents.bytes_contents.extend(pngs)
    response = stub.ModelInfer(request, timeout=60)
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(-1, 10)
    assert_matches(logits, reference[picks])


def code_and_message(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_bad_input_gets_the_right_status_naming_the_cause(stub, data):
    images, _ = data
    x = normalised(images[:1])
    cases = [
        (pixels_request(x, model="no-such-model"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (pixels_request(x[:, :2]), grpc.StatusCode.INVALID_ARGUMENT, "must have shape [N, 3, 32, 32]"),
        (pixels_request(np.zeros((65, 3, 32, 32), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
         "batch size 65"),
    ]
    wrong_type = pixels_request(x)
    wrong_type.inputs[0].datatype = "FP16"
    cases.append((wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "datatype FP32"))
    version = pixels_request(x)
    version.model_version = "7"
    cases.append((version, grpc.StatusCode.NOT_FOUND, "version 7"))
    undecodable = service_pb2.ModelInferRequest(model_name=MODEL)
    undecodable.inputs.add(name="image_bytes", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [png(images[0]), b"\x89PNG\r\n\x1a\n broken"])
    cases.append((undecodable, grpc.StatusCode.INVALID_ARGUMENT, "image 1:"))
    unknown_output = pixels_request(x)
    unknown_output.outputs.add(name="features")
    cases.append((unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "unknown output"))
    for request, code, needle in cases:
        got, message = code_and_message(lambda: stub.ModelInfer(request, timeout=60))
        assert (got, needle in message) == (code, True), (code, needle, got, message)
    # The server still answers after all of that.
    assert stub.ModelInfer(pixels_request(x), timeout=60).outputs


def test_an_expired_client_deadline_is_deadline_exceeded(stub, data):
    images, _ = data
    # A batch the server accepts (it runs with --max-batch-size 16), so that nothing but the
    # deadline can end the call; many calls, because whichever of the client's clock and the
    # server's ends one is a race, and every way it can go must say DEADLINE_EXCEEDED.
    request = pixels_request(normalised(images[:16]))
    codes = [code_and_message(lambda: stub.ModelInfer(request, timeout=0.0001))[0]
             for _ in range(50)]
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert stub.ModelInfer(pixels_request(normalised(images[:1])), timeout=60).outputs


def test_api_key_size_limit_and_overload():
    server = Server("--api-key", KEY, "--max-body-bytes", "200000", "--queue-capacity", "1")
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
        one = pixels_request(np.zeros((1, 3, 32, 32), np.float32))
        auth = [("authorization", f"Bearer {KEY}")]
        code, message = code_and_message(lambda: stub.ModelInfer(one, timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in message
        code, message = code_and_message(
            lambda: stub.ModelInfer(one, timeout=30, metadata=[("authorization", "Bearer wrong")]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in message
        code, _ = code_and_message(lambda: stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name=MODEL), timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Probes carry no credentials: health, ServerLive and ServerReady stay open.
        assert health(server.channel) == health_pb2.HealthCheckResponse.SERVING
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready
        assert stub.ModelInfer(one, timeout=30, metadata=auth).outputs
        # 3 x 3 x 32 x 32 FP32 values are 36 kB raw, but ~55 kB typed; 20 images exceed 200 kB.
        big = pixels_request(np.zeros((20, 3, 32, 32), np.float32))
        code, message = code_and_message(lambda: stub.ModelInfer(big, timeout=30, metadata=auth))
        assert code == grpc.StatusCode.OUT_OF_RANGE and "200000" in message, (code, message)
        # Two images never fit a queue of one: RESOURCE_EXHAUSTED with a retry pushback.
        two = pixels_request(np.zeros((2, 3, 32, 32), np.float32))
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(two, timeout=30, metadata=auth)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(e.value.trailing_metadata())
        assert trailers.get("grpc-retry-pushback-ms") == "1000", trailers
        assert stub.ModelInfer(one, timeout=30, metadata=auth).outputs
    finally:
        assert server.stop() == 0


def test_sigterm_drains_in_flight_calls_and_reports_not_serving(data):
    """Clients keep batches of 64 in flight; after SIGTERM the health check turns NOT_SERVING
    while the calls in flight finish with the right logits, calls that come later are refused
    with UNAVAILABLE, and the server exits 0."""
    images, reference = data
    server = Server()
    x = normalised(images[:64])
    # Set just before the signal and just after it: an UNAVAILABLE can only be the signal's
    # doing if `terminating` was set when it came back, and a call was in flight across the
    # signal if sent before `terminating` and answered after `signalled`.
    terminating, signalled = threading.Event(), threading.Event()
    outcomes, lock = [], threading.Lock()

    def load():
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
        request = pixels_request(x)
        while True:
            sent_after = terminating.is_set()
            try:
                response = stub.ModelInfer(request, timeout=60)
                logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(64, 10)
                outcome = "ok" if np.abs(logits - reference[:64]).max() <= 1e-3 else "wrong"
            except grpc.RpcError as e:
                outcome = e.code()
            ended = (terminating.is_set(), signalled.is_set())
            with lock:
                outcomes.append((sent_after, ended, outcome))
            if outcome != "ok" or ended[1] and time.monotonic() > give_up:
                return

    give_up = time.monotonic() + 120
    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    while len(outcomes) < 16:
        time.sleep(0.01)
    terminating.set()
    server.process.send_signal(signal.SIGTERM)
    signalled.set()
    seen = []
    deadline = time.monotonic() + 30
    while server.process.poll() is None and time.monotonic() < deadline:
        try:
            seen.append(health(server.channel))
        except grpc.RpcError as e:
            seen.append(e.code())
        time.sleep(0.005)
    for t in threads:
        t.join(timeout=60)
    assert server.process.wait(timeout=30) == 0
    server.channel.close()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen
    for sent_after, (ended_after_terminating, _), outcome in outcomes:
        assert outcome in ("ok", grpc.StatusCode.UNAVAILABLE), outcomes
        if outcome != "ok":
            assert ended_after_terminating, f"{outcome} before SIGTERM"
    across = sum(1 for sent_after, (_, after), o in outcomes if not sent_after and after and o == "ok")
    assert across > 0, f"no call in flight at SIGTERM was answered: {outcomes}"
