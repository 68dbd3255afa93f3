"""The frozen forward of extraction (prefix activations and zero-shot embedding) on an inference runtime.

Extraction is the one place where the backbone runs without anything trainable, on every image of
the pool, so it can run outside PyTorch:

- ``torch``: the model itself (CUDA where there is one).
- ``openvino``: the same module traced and converted by OpenVINO (no ONNX file), compiled for the
  CPU in fp32, one stream a core, each running requests of REQUEST_IMAGES images. Lite0's depthwise
  convolutions are what PyTorch's CPU kernels do worst: on 2 cores the forward alone ran at 320
  images/s against 63, the extraction step 3.1x faster on the same 2,000 images (benchmarks/scale.py,
  both in one run), and the embeddings agree with PyTorch's to cosine 0.9999999 per image there
  (tests/test_extract.py holds them to 0.9999, and to timm's own transform on PyTorch).
- ``auto``: ``torch`` on a CUDA device or for fewer than AUTO_MIN_IMAGES images (OpenVINO's
  conversion, 2.2-2.5 s for Lite0, costs more than it saves on a few hundred images), else ``openvino``.

Both are deterministic for a given input. fp32 is asked for explicitly: on CPUs with bf16 units
OpenVINO would otherwise choose bf16, whose embeddings no longer agree with the cached ones.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from grappa.core.augment import CentreCrop
from grappa.core.model import ZERO_SHOT, GrappaModel

RUNTIMES = ("auto", "torch", "openvino")
AUTO_MIN_IMAGES = 256
# images per OpenVINO request. Lite0's forward alone on 2 cores (2 streams, 4 requests in flight):
# 284 images/s with requests of 1, 259 of 4, 241 of 16, 219 of 32, and 223 for batches of 32 in one
# 2-thread stream (LATENCY, before); with decoding beside it 216-226 / 205-217 images/s for 1 / 2
REQUEST_IMAGES = 1
# (8-bit NCHW pixels of CentreCrop.pixels) -> (prefix activations at the model's start block or None,
# embeddings), on the CPU
FrozenForward = Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]


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


def frozen_forward(model: GrappaModel, crop: CentreCrop, runtime: str, device: torch.device,
                   images: int) -> tuple[FrozenForward, dict]:
    """The frozen forward of ``model`` on ``runtime`` (one of RUNTIMES) for ``images`` images of
    ``crop.pixels``, and what it is, for the report: {"name", "version", "device", "compile_s"}. The
    prefix activations are returned only when the model adapts from a block past the stem
    (``model.start > 0``), as extraction caches them. The pixels are normalised inside: a batch
    travels as 8 bits (on 2 cores with OpenVINO, 252-271 images/s decode + forward against 230-236
    with float batches, on 3,000 images)."""
    name = resolve_runtime(runtime, device, images)
    keep_acts = model.start > 0
    frozen = _Frozen(model, crop).eval()
    t0 = time.perf_counter()
    if name == "torch":
        frozen.to(device)

        def run(pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            with torch.inference_mode():
                acts, emb = frozen(pixels.to(device))
            return (acts.cpu() if keep_acts else None), emb.cpu()

        return run, {"name": name, "version": torch.__version__, "device": str(device), "compile_s": 0.0}

    import openvino as ov

    frozen.to("cpu")
    shape = (-1, 3, crop.size, crop.size)
    example = torch.zeros(2, *shape[1:], dtype=torch.uint8)
    chunk, model.cpu_chunk = model.cpu_chunk, None  # traced once for any batch: OpenVINO schedules its own work
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch.jit.trace is what OpenVINO's converter reads; its deprecation notice is not the user's to act on
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
            # traced here without the trace check (which runs the model again): 2.2 s instead of 2.9 for Lite0
            traced = torch.jit.trace(frozen, example, check_trace=False)
            converted = ov.convert_model(traced, example_input=example, input=[(shape, ov.Type.u8)])
    finally:
        model.cpu_chunk = chunk
    # THROUGHPUT: one stream a core, each running its own requests of REQUEST_IMAGES images; a
    # stream's activations stay in its core's cache, where a batch of 32 on both cores does not
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                           "PERFORMANCE_HINT": "THROUGHPUT"})
    streams = int(compiled.get_property("NUM_STREAMS"))
    requests = ov.AsyncInferQueue(compiled, 2 * streams)  # two a stream: the next is queued while one runs
    done: dict[int, tuple] = {}

    def collect(request, first: int) -> None:  # copies: the request reuses its output buffers
        done[first] = (np.array(request.get_output_tensor(0).data) if keep_acts else None,
                       np.array(request.get_output_tensor(1).data))

    requests.set_callback(collect)

    def run(pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = np.ascontiguousarray(pixels.numpy())
        done.clear()
        for first in range(0, len(x), REQUEST_IMAGES):
            requests.start_async({0: x[first:first + REQUEST_IMAGES]}, first)
        requests.wait_all()
        parts = [done[first] for first in sorted(done)]
        acts = torch.from_numpy(np.concatenate([a for a, _ in parts])) if keep_acts else None
        return acts, torch.from_numpy(np.concatenate([e for _, e in parts]))

    return run, {"name": name, "version": ov.__version__, "device": "cpu", "streams": streams,
                 "request_images": REQUEST_IMAGES, "compile_s": time.perf_counter() - t0}
