"""The frozen forward of extraction (prefix activations and zero-shot embedding) on an inference runtime.

Extraction is the one place where the backbone runs without anything trainable, on every image of
the pool, so it can run outside PyTorch:

- ``torch``: the model itself (CUDA where there is one).
- ``openvino``: the same module traced and converted by OpenVINO (no ONNX file), compiled for the
  CPU in fp32, one stream a core, each running requests of REQUEST_IMAGES images (the prefix on each
  image alone, the suffix on all of them; see _request_model). Lite0's depthwise
  convolutions are what PyTorch's CPU kernels do worst: on 2 cores the forward alone ran at 320
  images/s against 63, the extraction step 3.1x faster on the same 2,000 images (benchmarks/scale.py,
  both in one run), and the embeddings agree with PyTorch's to cosine 0.9999999 per image there
  (tests/test_extract.py holds them to 0.9999, and to timm's own transform on PyTorch).
- ``auto``: ``torch`` on a CUDA device or for fewer than AUTO_MIN_IMAGES images (OpenVINO's
  conversion, 2.7-5.5 s for Lite0, costs more than it saves on a few hundred images), else ``openvino``.

Both are deterministic for a given input. fp32 is asked for explicitly: on CPUs with bf16 units
OpenVINO would otherwise choose bf16, whose embeddings no longer agree with the cached ones.
"""
from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from grappa.core.augment import CentreCrop
from grappa.core.model import ZERO_SHOT, GrappaModel

RUNTIMES = ("auto", "torch", "openvino")
AUTO_MIN_IMAGES = 256
# images per OpenVINO request where the suffix is batched (see _request_model): Lite0 from block 11,
# the forward alone on 2 cores, 2 streams, 4 requests in flight, one run: 223-243 images/s with
# requests of 1 image through the whole model, 282-306 with requests of 8 (the prefix one image at a
# time, the suffix on the 8), the same outputs (max difference 0.0); requests of 16 were no faster
REQUEST_IMAGES = 8
# (key, 8-bit NCHW pixels of CentreCrop.pixels) batches -> (key, prefix activations at the model's start
# block or None, embeddings) of each, in order, on the CPU
FrozenForward = Callable[[Iterable[tuple[Any, torch.Tensor]]], Iterator[tuple[Any, torch.Tensor | None, torch.Tensor]]]


def resolve_runtime(name: str, device: torch.device, images: int) -> str:
    """The runtime ``name`` means on ``device`` for ``images`` images (``auto``: see the module's doc)."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; one of {', '.join(RUNTIMES)}")
    if name == "auto":
        return "torch" if device.type == "cuda" or images < AUTO_MIN_IMAGES else "openvino"
    return name


class _Frozen(nn.Module):
    """The model's frozen path as one module: 8-bit pixels -> (prefix activations, zero-shot embedding)."""

    def __init__(self, model: GrappaModel, crop: CentreCrop):
        super().__init__()
        self.model, self.crop = model, crop

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.model.forward_prefix(self.crop.normalise(pixels))
        return acts, self.model.forward_suffix(acts, ZERO_SHOT)[0]


def _convert(frozen: _Frozen, size: int):
    """``frozen`` traced and converted by OpenVINO for 8-bit batches of any size."""
    import openvino as ov

    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace is what OpenVINO's converter reads; its deprecation notice is not the user's to act on
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        # traced here without the trace check (which runs the model again): 2.2 s instead of 2.9 for Lite0
        traced = torch.jit.trace(frozen, example, check_trace=False)
        return ov.convert_model(traced, example_input=example, input=[((-1, 3, size, size), ov.Type.u8)])


def _batches_suffix(model: GrappaModel, size: int) -> bool:
    """Whether requests batch the suffix: where it starts on a CNN map of at most 1/16 of the input's
    side (Lite0's 14x14 from block 11), 8 of its maps fit in a core's cache; earlier maps do not (a
    whole Lite0 in requests of 4 images ran at 259 images/s against 284 for 1)."""
    shape = model.backbone.block_shapes[model.start - 1] if model.start > 0 else None
    return shape is not None and len(shape) == 3 and shape[-1] <= size // 16


def _request_model(whole, size: int, images: int):
    """From ``whole`` (the converted _Frozen, any batch), one OpenVINO model for requests of ``images``
    8-bit images -> (prefix activations, embeddings): the prefix run on each image alone (its large
    early maps stay in the core's cache), the suffix on all of them at once (7x7 maps: at batch 1 its
    matrix products are too small to use the core). The clones share the weights: peak RSS of the
    step stayed 1.77 GB at 50,000 images (benchmarks/scale.py, requests of 1 and of 8)."""
    import openvino as ov
    import openvino.opset13 as ops

    pixels = ops.parameter([images, 3, size, size], ov.Type.u8, name="pixels")
    one_each = ops.split(pixels, 0, images)
    acts = []
    for i in range(images):  # a clone's prefix on image i; its suffix is left out of the model below
        copy = whole.clone()
        copy.get_parameters()[0].output(0).replace(one_each.output(i))
        acts.append(copy.get_results()[0].input_value(0))
    acts = ops.concat(acts, 0)
    tail = whole.clone()  # its suffix reads the joined activations; its prefix is left out
    tail.get_results()[0].input_value(0).replace(acts.output(0))
    return ov.Model([ops.result(acts), ops.result(tail.get_results()[1].input_value(0))], [pixels], "frozen")


def frozen_forward(model: GrappaModel, crop: CentreCrop, runtime: str, device: torch.device,
                   images: int) -> tuple[FrozenForward, dict]:
    """The frozen forward of ``model`` on ``runtime`` (one of RUNTIMES) for ``images`` images of
    ``crop.pixels``, and what it is, for the report: {"name", "version", "device", "compile_s"} (and
    the streams and request size on OpenVINO). The forward maps (key, pixels) batches to (key, prefix
    activations, embeddings), in order; OpenVINO runs a batch while the next is queued, and gives the
    activations in float16 (torch in float32). The prefix activations are returned only when the
    model adapts from a block past the stem (``model.start > 0``), as extraction caches them. The
    pixels are normalised inside: a batch travels as 8 bits (on 2 cores with OpenVINO, 252-271
    images/s decode + forward against 230-236 with float batches, on 3,000 images)."""
    name = resolve_runtime(runtime, device, images)
    keep_acts = model.start > 0
    frozen = _Frozen(model, crop).eval()
    t0 = time.perf_counter()
    if name == "torch":
        frozen.to(device)

        def run(batches):
            for key, pixels in batches:
                with torch.inference_mode():
                    acts, emb = frozen(pixels.to(device))
                yield key, (acts.cpu() if keep_acts else None), emb.cpu()

        return run, {"name": name, "version": torch.__version__, "device": str(device), "compile_s": 0.0}

    import openvino as ov

    frozen.to("cpu")
    chunk, model.cpu_chunk = model.cpu_chunk, None  # traced once for any batch: OpenVINO schedules its own work
    try:
        per_request = REQUEST_IMAGES if _batches_suffix(model, crop.size) else 1
        converted = _convert(frozen, crop.size)
        if per_request > 1:
            converted = _request_model(converted, crop.size, per_request)
    finally:
        model.cpu_chunk = chunk
    if keep_acts:  # in float16, as the cache keeps them: half the bytes to copy out, no conversion pass after
        from openvino.preprocess import PrePostProcessor

        half = PrePostProcessor(converted)
        half.output(0).tensor().set_element_type(ov.Type.f16)
        converted = half.build()
    # THROUGHPUT: one stream a core, each running its own requests; a stream's activations stay in its
    # core's cache, where a batch of 32 on both cores does not
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                           "PERFORMANCE_HINT": "THROUGHPUT"})
    streams = int(compiled.get_property("NUM_STREAMS"))
    requests = ov.AsyncInferQueue(compiled, 2 * streams)  # two a stream: the next is queued while one runs

    def collect(request, slot: tuple[list, int]) -> None:  # copies: the request reuses its output buffers
        parts, j = slot
        parts[j] = (np.array(request.get_output_tensor(0).data) if keep_acts else None,
                    np.array(request.get_output_tensor(1).data))

    requests.set_callback(collect)

    def joined(key, parts: list, n: int) -> tuple:  # the last request's padding dropped
        acts = torch.from_numpy(np.concatenate([a for a, _ in parts])[:n]) if keep_acts else None
        return key, acts, torch.from_numpy(np.concatenate([e for _, e in parts])[:n])

    def run(batches):
        # a batch's requests are queued behind the previous batch's, never after a wait for it: waiting
        # for each batch left both streams idle at its end
        queued: deque[tuple[Any, list, int]] = deque()
        for key, pixels in batches:
            x = pixels.numpy()
            n = len(x)
            if n % per_request:  # requests have a fixed size: the last one is padded with black images
                x = np.concatenate([x, np.zeros((per_request - n % per_request, *x.shape[1:]), x.dtype)])
            x = np.ascontiguousarray(x)
            parts: list = [None] * (len(x) // per_request)
            for j in range(len(parts)):  # start_async copies the input, and waits while every request is busy
                requests.start_async({0: x[j * per_request:(j + 1) * per_request]}, (parts, j))
            queued.append((key, parts, n))
            while len(queued) > 1 and all(p is not None for p in queued[0][1]):
                yield joined(*queued.popleft())
        requests.wait_all()
        while queued:
            yield joined(*queued.popleft())

    return run, {"name": name, "version": ov.__version__, "device": "cpu", "streams": streams,
                 "request_images": per_request, "suffix_batched": per_request > 1,
                 "compile_s": time.perf_counter() - t0}
