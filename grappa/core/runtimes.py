"""The frozen forward of extraction (prefix activations and zero-shot embedding) on an inference runtime.

Extraction is the one place where the backbone runs without anything trainable, on every image of
the pool, so it can run outside PyTorch:

- ``torch``: the model itself (CUDA where there is one).
- ``openvino``: the same module traced by OpenVINO (no ONNX file) and compiled for the CPU in fp32.
  Lite0's depthwise convolutions are what PyTorch's CPU kernels do worst: on 2 cores the forward
  alone ran at 154-166 images/s against 42-48, the extraction step 2.3-2.4x faster on the same
  2,000 images (benchmarks/scale.py, both in one run, two runs), and the embeddings agree with
  PyTorch's to cosine 0.9999999 per image there (tests/test_extract.py holds them to 0.9999).
- ``auto``: ``torch`` on a CUDA device or for fewer than AUTO_MIN_IMAGES images (OpenVINO's
  conversion, 2.5 s for the tests' tiny model and about 4 s for Lite0, costs more than it saves on a
  few hundred images), else ``openvino``.

Both are deterministic for a given input. fp32 is asked for explicitly: on CPUs with bf16 units
OpenVINO would otherwise choose bf16, whose embeddings no longer agree with the cached ones.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from grappa.core.model import ZERO_SHOT, GrappaModel

RUNTIMES = ("auto", "torch", "openvino")
AUTO_MIN_IMAGES = 256
# (images NCHW float32) -> (prefix activations at the model's start block or None, embeddings), on the CPU
FrozenForward = Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]


def resolve_runtime(name: str, device: torch.device, images: int) -> str:
    """The runtime ``name`` means on ``device`` for ``images`` images (``auto``: see the module's doc)."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; one of {', '.join(RUNTIMES)}")
    if name == "auto":
        return "torch" if device.type == "cuda" or images < AUTO_MIN_IMAGES else "openvino"
    return name


class _Frozen(nn.Module):
    """The model's frozen path as one module: images -> (prefix activations, zero-shot embedding)."""

    def __init__(self, model: GrappaModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.model.forward_prefix(images)
        return acts, self.model.forward_suffix(acts, ZERO_SHOT)[0]


def frozen_forward(model: GrappaModel, runtime: str, device: torch.device, image_size: int,
                   images: int) -> tuple[FrozenForward, dict]:
    """The frozen forward of ``model`` on ``runtime`` (one of RUNTIMES) for ``images`` images, and what
    it is, for the report: {"name", "version", "device", "compile_s"}. The prefix activations are
    returned only when the model adapts from a block past the stem (``model.start > 0``), as
    extraction caches them."""
    name = resolve_runtime(runtime, device, images)
    keep_acts = model.start > 0
    frozen = _Frozen(model).eval()
    t0 = time.perf_counter()
    if name == "torch":
        frozen.to(device)

        def run(images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            with torch.inference_mode():
                acts, emb = frozen(images.to(device))
            return (acts.cpu() if keep_acts else None), emb.cpu()

        return run, {"name": name, "version": torch.__version__, "device": str(device), "compile_s": 0.0}

    import openvino as ov

    frozen.to("cpu")
    example = torch.zeros(2, 3, image_size, image_size)
    chunk, model.cpu_chunk = model.cpu_chunk, None  # traced once for any batch: OpenVINO schedules its own work
    try:
        with torch.no_grad():
            converted = ov.convert_model(frozen, example_input=example, input=[(-1, 3, image_size, image_size)])
    finally:
        model.cpu_chunk = chunk
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                           "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        out = request.infer({0: np.ascontiguousarray(images.numpy(), dtype=np.float32)})
        emb = torch.from_numpy(np.array(out[1]))  # copies: the request reuses its output buffers
        return (torch.from_numpy(np.array(out[0])) if keep_acts else None), emb

    return run, {"name": name, "version": ov.__version__, "device": "cpu", "compile_s": time.perf_counter() - t0}
