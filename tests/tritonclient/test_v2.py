"""The Open Inference Protocol routes driven by the Triton HTTP client (tritonclient[http]).

Needs RESNET_URL (host:port of a server running the seed-random weights) and RESNET_SHARED_DIR
(the reference data); scripts/test-tritonclient.sh provides both.
"""

import base64
import json
import os
import struct
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from safetensors.numpy import load_file
from tritonclient.utils import InferenceServerException

URL = os.environ["RESNET_URL"]
SHARED = os.environ["RESNET_SHARED_DIR"]
TOLERANCE = 1e-3
# The notebook's normalisation, with which the seed-random reference logits were computed.
MEAN = np.array([0.491, 0.482, 0.447], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.247, 0.243, 0.262], dtype=np.float32).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def client():
    c = httpclient.InferenceServerClient(url=URL, connection_timeout=60, network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model():
    with urllib.request.urlopen(f"http://{URL}/v1/model", timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def data():
    images = load_file(os.path.join(SHARED, "data/cifar10-test-846.safetensors"))["images"]
    logits = load_file(os.path.join(SHARED, "reference/logits.safetensors"))["seed_random_logits"]
    assert images.shape == (846, 3, 32, 32) and images.dtype == np.uint8
    return images, logits


def normalised(images):
    return ((images.astype(np.float32) / np.float32(255.0) - MEAN) / STD).astype(np.float32)


def png(chw):
    """A minimal RGB PNG (no dependency on an imaging library)."""
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    raw = b"".join(b"\x00" + row.tobytes() for row in hwc)

    def chunk(kind, payload):
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", hwc.shape[1], hwc.shape[0], 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def assert_matches(logits, reference):
    assert logits.shape == reference.shape
    assert logits.dtype == np.float32
    diff = np.abs(logits - reference).max()
    assert diff <= TOLERANCE, f"max |diff| {diff}"
    assert (logits.argmax(axis=1) == reference.argmax(axis=1)).all()


def softmax(x):
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_health_and_metadata(client, model):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model["name"])
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(model["name"])
    assert meta["name"] == model["name"]
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"input": ("FP32", [-1, 3, 32, 32]), "image_bytes": ("BYTES", [-1])}
    classes = model["num_classes"]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {
        "logits": ("FP32", [-1, classes]),
        "probabilities": ("FP32", [-1, classes]),
    }
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


def test_model_normalisation_is_the_notebooks(model):
    np.testing.assert_allclose(model["mean"], MEAN.ravel(), atol=1e-6)
    np.testing.assert_allclose(model["std"], STD.ravel(), atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_infer_matches_pytorch(client, model, data, binary):
    images, reference = data
    picks = np.arange(0, 846, 106)[:8]
    x = normalised(images[picks])
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("logits", binary_data=binary),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = client.infer(model["name"], [tensor], outputs=outputs, request_id="r-42")
    logits = result.as_numpy("logits")
    assert_matches(logits, reference[picks])
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(logits), atol=1e-6)
    assert result.get_response()["id"] == "r-42"


def test_default_outputs_are_binary_and_complete(client, model, data):
    images, reference = data
    picks = np.array([845])
    tensor = httpclient.InferInput("input", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(normalised(images[picks]))
    result = client.infer(model["name"], [tensor])
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["logits", "probabilities"]
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    assert_matches(result.as_numpy("logits"), reference[picks])


def test_bytes_input_png_binary_and_base64(client, model, data):
    images, reference = data
    picks = np.array([1, 2, 3])
    pngs = [png(images[i]) for i in picks]

    binary = httpclient.InferInput("image_bytes", [len(pngs)], "BYTES")
    binary.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    result = client.infer(model["name"], [binary])
    assert_matches(result.as_numpy("logits"), reference[picks])

    as_json = httpclient.InferInput("image_bytes", [len(pngs)], "BYTES")
    encoded = [base64.b64encode(p).decode("ascii") for p in pngs]
    as_json.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer(model["name"], [as_json], outputs=outputs)
    assert_matches(result.as_numpy("logits"), reference[picks])


def test_errors_reach_the_client(client, model, data):
    images, _ = data
    with pytest.raises(InferenceServerException, match="no-such-model"):
        client.get_model_metadata("no-such-model")
    tensor = httpclient.InferInput("input", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(normalised(images[:1]))
    with pytest.raises(InferenceServerException, match="no-such-model") as e:
        client.infer("no-such-model", [tensor])
    assert e.value.status() == "404"
    wrong = httpclient.InferInput("input", [1, 3, 32, 32], "FP64")
    wrong.set_data_from_numpy(normalised(images[:1]).astype(np.float64))
    with pytest.raises(InferenceServerException, match="FP32") as e:
        client.infer(model["name"], [wrong])
    assert e.value.status() == "400"
