"""ONNX export of a backbone + head :class:`aggnets.Embedder` or of a bare pooling head, checked with onnxruntime.

>>> path = export_onnx(embedder, "model.onnx")                       # (B, 3, H, W) images -> (B, out_dim)
>>> check_onnx(embedder, path, [torch.randn(1, 3, 224, 224), torch.randn(3, 3, 288, 256)])  # max |onnx - torch|

The graph is exported with the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``); the
TorchScript exporter bakes shape-derived constants (e.g. NetVLAD, NetFV fail to load; BoF is wrong at another H x W).
The exported graph takes the image / feature map only (no mask) and runs in eval mode.

Dynamic H x W is declared by each head (``head.capabilities.dynamic_onnx``): every registered head exports at any
H x W — reductions over all positions, 1x1-conv assignments and sums (N read from the graph's shape); R-MAC's region
grid and a spatial pyramid's cells are computed with tensors from H, W under ``torch.export`` (a pyramid is dynamic
when its wrapped head is, and takes a mask in one graph). A head whose declaration says otherwise is exported with
the H x W of the example input fixed (the batch stays dynamic): onnxruntime rejects another size with
``INVALID_ARGUMENT`` instead of returning a wrong descriptor.

Heads whose masked form is not one graph (``capabilities.fullgraph`` False: R-MAC, spatial pyramids, which crop each
image to its valid box) are exported without a mask: exporting them with a mask raises ``ValueError``. A bare head
that takes the backbone's global token (``capabilities.global_token``) is exported with two inputs, ``x`` and
``token`` (B, C); inside an :class:`~aggnets.Embedder` the token comes from the backbone. :func:`export_onnx` also
refuses to return a graph whose inputs lost a dimension it was asked to keep dynamic, and (``verify=True``) checks
the graph with onnxruntime at the example size and at a second batch / size.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .heads.base import PoolingHead
from .models import Embedder

__all__ = ["supports_dynamic_hw", "export_onnx", "check_onnx"]

Inputs = Union[Tensor, Sequence[Tensor]]


def _head(model: nn.Module) -> nn.Module:
    if isinstance(model, Embedder):
        return model.head
    if isinstance(model, PoolingHead):
        return model
    raise TypeError(f"export_onnx: expected an aggnets.Embedder or a pooling head, got {type(model).__name__}")


def supports_dynamic_hw(model: nn.Module) -> bool:
    """Whether the ONNX graph of ``model`` (an Embedder or a head) is right at every H x W: its head's
    ``capabilities.dynamic_onnx`` and, for an Embedder, its backbone's ``dynamic_onnx`` (CNNs: yes; a ViT with
    timm's position interpolation: yes; with the DINOv2 scale-factor rule: no, the exporter bakes the scales)."""
    head = _head(model)
    capabilities = getattr(head, "capabilities", None)
    backbone_ok = not isinstance(model, Embedder) or bool(getattr(model.backbone, "dynamic_onnx", True))
    return bool(getattr(capabilities, "dynamic_onnx", False)) and backbone_ok


def _takes_token(model: nn.Module) -> bool:
    """A bare head that uses the global token is exported with a ``token`` input."""
    return isinstance(model, PoolingHead) and model.uses_token


class _WithoutMask(nn.Module):
    """``model(x)`` (or ``model(x, None, token)`` for a token head) with no mask argument."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, token: Optional[Tensor] = None) -> Tensor:
        return self.model(x) if token is None else self.model(x, None, token)


def _as_inputs(inputs: Inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _parameter(model: nn.Module) -> Tensor:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor
    return torch.zeros(())


def _default_size(model: nn.Module) -> tuple[int, int, int, int]:
    if isinstance(model, Embedder):
        return (1, 3, 224, 224)
    return (1, _head(model).in_channels, 7, 7)


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], *,
                example_size: Optional[Sequence[int]] = None, dynamic_batch: bool = True, dynamic_hw: bool = True,
                opset: Optional[int] = None, verify: bool = True, atol: float = 1e-4) -> str:
    """Export ``model`` (an :class:`aggnets.Embedder` taking (B, 3, H, W) images, or a head taking a (B, C, H, W)
    feature map) to the ONNX file ``path`` (input ``x``, output ``descriptor`` (B, out_dim)); return ``path``.

    ``example_size`` is the traced input size (default (1, 3, 224, 224) for an Embedder, (1, C, 7, 7) for a head); it
    is also the fixed H x W when the head does not declare ``dynamic_onnx`` (exported with a fixed H x W and dynamic
    batch, with a warning, when ``dynamic_hw=True``). A bare head that uses the global token gets a second input,
    ``token`` (B, C).
    ``opset`` is passed to the exporter (``None``: its default). The model is exported in eval mode; its training
    flag is restored afterwards. ``verify`` runs :func:`check_onnx` at the example size and at a second size
    (another batch and, when H x W is dynamic, another H x W) and raises if onnxruntime and PyTorch differ by more
    than ``atol``.
    """
    example_size = tuple(example_size or _default_size(model))
    if len(example_size) != 4:
        raise ValueError(f"export_onnx: example_size must be (B, C, H, W), got {example_size}")
    hw = bool(dynamic_hw) and supports_dynamic_hw(model)
    if dynamic_hw and not hw:
        warnings.warn(f"export_onnx: the {type(_head(model)).__name__} head (or the backbone) does not declare "
                      "dynamic_onnx; "
                      f"exporting with a fixed H x W = {example_size[2]} x {example_size[3]} (dynamic batch only)",
                      stacklevel=2)
    reference = _parameter(model)
    batch, channels, height, width = example_size
    # torch.export specialises dimensions of size 0 / 1: trace dynamic ones at >= 2
    trace_size = (max(batch, 2) if dynamic_batch else batch, channels,
                  max(height, 2) if hw else height, max(width, 2) if hw else width)
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    token = _takes_token(model)

    def example_inputs(size: Sequence[int]) -> Inputs:
        x = torch.randn(tuple(size), dtype=dtype, device=reference.device)
        if isinstance(model, PoolingHead) and model.capabilities.input_domain == "nonnegative":
            x = x.relu()
        return (x, torch.randn(size[0], size[1], dtype=dtype, device=reference.device)) if token else x

    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim.DYNAMIC
    if hw:
        dims[2] = dims[3] = torch.export.Dim.DYNAMIC
    shapes = ({**dims}, {0: dims[0]} if dynamic_batch else None) if token else ({**dims},)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_WithoutMask(model).eval(), _as_inputs(example_inputs(trace_size)), str(path),
                              dynamo=True, external_data=False, input_names=["x", "token"] if token else ["x"],
                              output_names=["descriptor"], dynamic_shapes=shapes if dims else None,
                              opset_version=opset, verbose=False)
    finally:
        model.train(was_training)
    _check_dynamic_inputs(str(path), set(dims))
    if verify:
        second = (batch + 2 if dynamic_batch else batch, channels,
                  height + max(2, height // 4) if hw else height, width + max(3, width // 8) if hw else width)
        check_onnx(model, path, [example_inputs(size) for size in (example_size, second)], atol=atol)
    return str(path)


def _check_dynamic_inputs(path: str, dynamic: set[int]) -> None:
    """Raise if the exporter silently fixed an input dimension that was asked to be dynamic."""
    import onnx

    graph_input = onnx.load(path, load_external_data=False).graph.input[0]
    shape = graph_input.type.tensor_type.shape.dim
    fixed = [axis for axis in sorted(dynamic) if not shape[axis].dim_param]
    if fixed:
        raise RuntimeError(f"export_onnx: the exporter fixed input dimension(s) {fixed} of {path} that should be "
                           "dynamic (the model's graph depends on them in Python); export with them fixed instead")


def check_onnx(model: nn.Module, path: Union[str, os.PathLike], inputs: Sequence[Inputs],
               atol: Optional[float] = 1e-4) -> float:
    """Run the ONNX file ``path`` with onnxruntime (CPUExecutionProvider) on every input and compare with ``model``
    in eval mode; return the largest absolute difference. An input is a tensor, or ``(x, token)`` for a bare head
    exported with a token. Raises ``AssertionError`` on a shape mismatch or when the difference exceeds ``atol``
    (``None``: never), and onnxruntime's error for an input size the graph rejects."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        for item in inputs:
            tensors = _as_inputs(item)
            x = tensors[0]
            with torch.no_grad():
                expected = _WithoutMask(model)(*tensors).detach().cpu().numpy()
            actual = session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)})[0]
            if actual.shape != expected.shape:
                raise AssertionError(f"check_onnx: ONNX output {actual.shape} != PyTorch {expected.shape} "
                                     f"for input {tuple(x.shape)}")
            diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
            if not np.isfinite(diff):
                diff = float("inf") if not np.array_equal(np.isnan(actual), np.isnan(expected)) else 0.0
            worst = max(worst, diff)
            if atol is not None and diff > atol:
                raise AssertionError(f"check_onnx: max |onnx - torch| = {diff:.3g} > {atol:g} for input "
                                     f"{tuple(x.shape)} ({path})")
    finally:
        model.train(was_training)
    return worst
