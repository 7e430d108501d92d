"""Regenerates the fuzz seed corpora under seeds/<target>/ (Pillow for the images, the standard
library for the rest). Every seed is tiny; the safetensors seeds are headers only (the `weights`
target appends zeroed data), and the checkpoint seeds carry their tensor data deflated."""

import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

from PIL import Image

SEEDS = Path(__file__).resolve().parent / "seeds"


def write(target, name, data):
    path = SEEDS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"{path.relative_to(SEEDS)}: {len(data)} bytes")


# --- images -------------------------------------------------------------------------------

def pattern(mode, size, seed=0):
    im = Image.new(mode, size)
    px = im.load()
    for y in range(size[1]):
        for x in range(size[0]):
            v = (x * 67 + y * 31 + seed) % 256
            px[x, y] = {
                "RGB": (v, (v * 3) % 256, 255 - v),
                "RGBA": (v, (v * 3) % 256, 255 - v, (v * 7) % 256),
                "L": v,
                "I;16": v * 257,
                "CMYK": (v, 255 - v, v // 2, 10),
            }[mode]
    return im


def image(name, im, fmt, **options):
    out = io.BytesIO()
    im.save(out, fmt, **options)
    write("preprocess", name, out.getvalue())


def images():
    image("rgb-2x2.png", pattern("RGB", (2, 2)), "PNG")
    image("rgba-3x5.png", pattern("RGBA", (3, 5)), "PNG")
    image("gray16-4x3.png", pattern("I;16", (4, 3)), "PNG")
    image("palette-5x4.png", pattern("RGB", (5, 4)).quantize(4), "PNG")
    image("wide-64x2.png", pattern("RGB", (64, 2)), "PNG")
    image("rgb-8x8.jpg", pattern("RGB", (8, 8)), "JPEG", quality=50)
    image("gray-progressive-9x7.jpg", pattern("L", (9, 7)), "JPEG", progressive=True, quality=50)
    image("cmyk-4x4.jpg", pattern("CMYK", (4, 4)), "JPEG", quality=50)
    frames = [pattern("RGB", (4, 4), seed).quantize(8) for seed in (0, 99)]
    image("anim-4x4.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image("still-3x2.gif", pattern("RGB", (3, 2)).quantize(4), "GIF")
    image("rgb-3x3.bmp", pattern("RGB", (3, 3)), "BMP")
    image("palette-4x2.bmp", pattern("RGB", (4, 2)).quantize(4), "BMP")
    image("lossy-4x4.webp", pattern("RGB", (4, 4)), "WEBP", quality=50)
    image("lossless-rgba-3x3.webp", pattern("RGBA", (3, 3)), "WEBP", lossless=True)
    image("rgb-3x2.tif", pattern("RGB", (3, 2)), "TIFF")
    image("gray-lzw-4x4.tif", pattern("L", (4, 4)), "TIFF", compression="tiff_lzw")
    image("rgba-deflate-2x3.tif", pattern("RGBA", (2, 3)), "TIFF", compression="tiff_adobe_deflate")


def jpegs():
    """Seeds of the `jpeg` target: JPEG files of every structure, without the three signature
    bytes the target puts back."""
    def jpeg(name, im, **options):
        out = io.BytesIO()
        im.save(out, "JPEG", **options)
        write("jpeg", name, out.getvalue()[3:])

    jpeg("ycc444-8x8.jpg", pattern("RGB", (8, 8)), quality=60, subsampling=0)
    jpeg("ycc422-17x9.jpg", pattern("RGB", (17, 9)), quality=60, subsampling=1)
    jpeg("ycc420-18x17.jpg", pattern("RGB", (18, 17)), quality=60, subsampling=2)
    jpeg("progressive-16x16.jpg", pattern("RGB", (16, 16)), quality=60, progressive=True)
    jpeg("restart-optimized-24x8.jpg", pattern("RGB", (24, 8)), quality=60, optimize=True,
         restart_marker_blocks=1)
    jpeg("rgb-adobe-4x4.jpg", pattern("RGB", (4, 4)), quality=60, keep_rgb=True)
    jpeg("gray-progressive-restart-9x7.jpg", pattern("L", (9, 7)), quality=60, progressive=True,
         restart_marker_rows=1)
    jpeg("cmyk-progressive-5x5.jpg", pattern("CMYK", (5, 5)), quality=60, progressive=True)
    jpeg("1x1.jpg", pattern("RGB", (1, 1)), quality=60)


# --- weights (safetensors headers) --------------------------------------------------------

DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}


def resnet_tensors(blocks, projection, conv_bias, classes=10, paper=False):
    """(name, shape) of every tensor of a CIFAR ResNet of `blocks` blocks per stage."""
    out, bns = [], []

    def conv(prefix, cout, cin, k):
        out.append((f"{prefix}.weight", [cout, cin, k, k]))
        if conv_bias:
            out.append((f"{prefix}.bias", [cout]))

    conv("conv1", 16, 3, 3)
    bns.append(("bn1", 16))
    channels = [16, 32, 64]
    for stage in range(3):
        for i in range(blocks):
            cout = channels[stage]
            cin = cout if i > 0 or stage == 0 else channels[stage - 1]
            p = f"{'layer' if paper else 'block'}{stage + 1}.{i}"
            conv(f"{p}.conv1", cout, cin, 3)
            conv(f"{p}.conv2", cout, cout, 3)
            bns += [(f"{p}.bn1", cout), (f"{p}.bn2", cout)]
            if projection and i == 0 and stage > 0:
                short = "shortcut" if paper else "residual"
                conv(f"{p}.{short}.0", cout, cin, 1)
                bns.append((f"{p}.{short}.1", cout))
    for prefix, c in bns:
        out += [(f"{prefix}.{f}", [c]) for f in ("weight", "bias", "running_mean", "running_var")]
    out += [("linear.weight" if paper else "fc.weight", [classes, 64])]
    out += [("linear.bias" if paper else "fc.bias", [classes])]
    return out


def header(tensors, dtype, metadata=None, extra=()):
    entries, offset = {}, 0
    for name, shape, *rest in list((n, s) for n, s in tensors) + list(extra):
        dt = rest[0] if rest else dtype
        size = DTYPE_SIZE[dt]
        for d in shape:
            size *= d
        entries[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        entries["__metadata__"] = metadata
    return json.dumps(entries, separators=(",", ":")).encode()


def weights():
    meta = {
        "mean": "[0.5,0.5,0.5]",
        "std": "[0.25,0.25,0.25]",
        "labels": json.dumps([f"c{i}" for i in range(10)]),
        "name": "tiny",
        "source": "seed",
    }
    write("weights", "resnet8-zeropad-f16.json", header(resnet_tensors(1, False, False), "F16", meta))
    write(
        "weights",
        "resnet8-projection-bias-bf16.json",
        header(resnet_tensors(1, True, True, classes=3), "BF16",
               extra=[("bn1.num_batches_tracked", [], "I64")]),
    )
    write("weights", "resnet8-paper-names-f32.json", header(resnet_tensors(1, False, False, paper=True), "F32"))
    # A complete (if architecture-less) safetensors file: length, header, data.
    head = header([("fc.weight", [2, 4]), ("fc.bias", [2])], "F32", {"name": "x"})
    write("weights", "small-file.safetensors",
          struct.pack("<Q", len(head)) + head + struct.pack("<10f", *range(10)))


# --- PyTorch checkpoints ------------------------------------------------------------------

def fake_torch():
    """Just enough of `torch` for pickle to name its classes and functions."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for cls in ("FloatStorage", "HalfStorage", "LongStorage"):
        setattr(torch, cls, type(cls, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise NotImplementedError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return torch, utils


TORCH, UTILS = fake_torch()


class Storage:
    def __init__(self, key, cls, numel, view=None):
        self.key, self.cls, self.numel, self.view = key, cls, numel, view


class Tensor:
    def __init__(self, storage, shape, offset=0):
        self.storage, self.shape, self.offset = storage, shape, offset

    def __reduce__(self):
        stride, s = [], 1
        for d in reversed(self.shape):
            stride.insert(0, s)
            s *= d
        return (UTILS._rebuild_tensor_v2,
                (self.storage, self.offset, tuple(self.shape), tuple(stride), False,
                 collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    legacy = False

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            pid = ("storage", obj.cls, obj.key, "cpu", obj.numel)
            return pid + (obj.view,) if self.legacy else pid
        return None


def dumps(obj, legacy=False):
    out = io.BytesIO()
    pickler = TorchPickler(out, protocol=2)
    pickler.legacy = legacy
    pickler.dump(obj)
    return out.getvalue()


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def zip_checkpoint(state_dict, storages, compression):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        z.writestr("archive/data.pkl", dumps(state_dict))
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def checkpoints():
    # A resnet8 state dict in the public checkpoints' naming, every tensor its own half storage
    # of zeros (deflated, so the seed stays small).
    state, storages = collections.OrderedDict(), {}
    for i, (name, shape) in enumerate(resnet_tensors(1, False, False, paper=True)):
        state[f"module.{name}"] = Tensor(Storage(str(i), TORCH.HalfStorage, numel(shape)), shape)
        storages[str(i)] = bytes(2 * numel(shape))
    state["module.bn1.num_batches_tracked"] = Tensor(Storage("nbt", TORCH.LongStorage, 1), [])
    storages["nbt"] = bytes(8)
    write("pytorch", "resnet8-paper-f16-deflated.pth",
          zip_checkpoint({"state_dict": state, "epoch": 1}, storages, zipfile.ZIP_DEFLATED))

    # Two small float tensors sharing one storage, stored uncompressed as torch.save does.
    shared = Storage("0", TORCH.FloatStorage, 6)
    small = collections.OrderedDict(
        [("fc.weight", Tensor(shared, [1, 4])), ("fc.bias", Tensor(shared, [2], offset=4))])
    write("pytorch", "small-zip.pth",
          zip_checkpoint(small, {"0": struct.pack("<6f", *range(6))}, zipfile.ZIP_STORED))

    # The legacy (pre-1.6) stream: magic, protocol, system info, object, keys, raw storages;
    # one tensor is a view into a larger storage.
    root = Storage("0", TORCH.FloatStorage, 8)
    view = Storage("0", TORCH.FloatStorage, 8, ("1", 2, 4))
    legacy_state = {"fc.weight": Tensor(root, [2, 2]), "fc.bias": Tensor(view, [4])}
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    data = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + dumps(legacy_state, legacy=True)
            + pickle.dumps(["0"], protocol=2) + struct.pack("<Q", 8) + struct.pack("<8f", *range(8)))
    write("pytorch", "small-legacy.th", data)


if __name__ == "__main__":
    images()
    jpegs()
    weights()
    checkpoints()
