"""The backbone wrapper: a truncated CNN that returns one layer's (B, C, H, W) feature map."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..utils import close_names
from .output import BackboneOutput

__all__ = ["BackboneBase", "FeatureExtractor", "FreezeSpec", "check_images"]

FreezeSpec = Union[bool, str, Sequence[str], None]
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def check_images(images: object, name: str, channels: int) -> None:
    """``TypeError`` / ``ValueError`` unless ``images`` is a floating (B, channels, H, W) tensor."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"{name}: images must have shape (B, {channels}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: images must be floating point (scaled to [0, 1]), got {images.dtype}")


def probe_forward(module: nn.Module, height: int, width: int, call: Optional[Callable[[Tensor], Any]] = None, *,
                  channels: int = 3, dtype: Optional[torch.dtype] = None) -> Any:
    """``call(zeros(1, channels, height, width))`` (``call`` defaults to ``module``) at no grad with ``module`` in eval
    mode (its mode restored), on its parameters' device: how a feature map's size is measured (a forward on the
    meta device is not portable across models). The one probe of backbone construction, ``output_size`` and the
    padded-batch extraction."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else None
    dtype = dtype if dtype is not None else (param.dtype if param is not None and param.is_floating_point() else None)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return (call or module)(torch.zeros(1, channels, height, width, device=device, dtype=dtype))
    finally:
        module.train(was_training)


class BackboneBase(nn.Module):
    """What every backbone wrapper shares: its ``name``, the input normalisation of its weights (``mean`` / ``std``
    for [0, 1] images, applied in the forward when ``normalize_images``) and the list of frozen modules. Subclasses
    set ``layer``, ``out_channels``, ``stride`` and implement ``extract(images, sizes=None)``."""

    has_token = False
    padded_batches = False
    dynamic_onnx = True  # an exported graph takes any image size (the head decides)
    __jit_unused_properties__ = ["normalize_input"]

    def __init__(self, *, name: str, mean: Sequence[float], std: Sequence[float], normalize_images: bool) -> None:
        super().__init__()
        self.name = name
        self.normalize_images = normalize_images
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._frozen_modules: list[str] = []

    def normalize(self, images: Tensor) -> Tensor:
        """``(images - mean) / std`` for [0, 1] images."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _prepare(self, images: Tensor) -> Tensor:
        """Checked and (``normalize_images``) normalised images."""
        check_images(images, self.name, self.mean.shape[1])
        return self.normalize(images) if self.normalize_images else images

    @property
    def normalize_input(self) -> bool:
        """Deprecated name of ``normalize_images`` (heads use ``normalize_input`` for the L2 of local descriptors)."""
        warnings.warn("backbone.normalize_input is deprecated: it is normalize_images", FutureWarning, stacklevel=2)
        return self.normalize_images

    @property
    def frozen_modules(self) -> list[str]:
        return list(self._frozen_modules)


class FeatureExtractor(BackboneBase):
    """A CNN truncated after ``layer``: images (B, 3, H, W) -> feature map (B, out_channels, H', W').

    ``out_channels`` and ``stride`` (input pixels per feature-map cell, so ``H' ~ ceil(H / stride)``) are known at
    construction, so a head can be built from the backbone alone. ``mean`` / ``std`` are the input normalisation
    constants of the weights, for images scaled to [0, 1]; with ``normalize_images=True`` the forward applies them, so
    callers feed [0, 1] RGB images; with False, callers normalise (``backbone.normalize(x)``).

    ``freeze``: True freezes everything; a module name freezes every module up to and including it (in execution
    order); a list of names freezes those modules. Frozen parameters get ``requires_grad=False`` and frozen
    normalisation layers stay in eval mode under ``.train()`` (their running statistics do not move).

    A CNN has no global token (``has_token`` False) and cannot re-mask a padded batch by itself
    (``padded_batches`` False: :func:`aggnets.retrieval.extract_descriptors` re-masks it with hooks instead).
    """

    def __init__(self, body: nn.Module, *, name: str, layer: str, out_channels: int, stride: int,
                 mean: Sequence[float], std: Sequence[float], normalize_images: bool = True,
                 freeze: FreezeSpec = False, output_key: Optional[str] = None) -> None:
        super().__init__(name=name, mean=mean, std=std, normalize_images=normalize_images)
        self.body = body
        self.layer = layer
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self._output_key = output_key
        self.freeze(freeze)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, out_channels, H', W') feature map."""
        out = self.body(self._prepare(images))
        return out[self._output_key] if self._output_key is not None else out

    def extract(self, images: Tensor, sizes: Optional[Tensor] = None) -> BackboneOutput:
        """The feature map as a :class:`BackboneOutput` (no token, no mask). ``sizes`` is not supported (a CNN
        cannot re-mask a padded batch by itself)."""
        if sizes is not None:
            raise ValueError(f"{self.name}: a CNN backbone does not take image sizes (padded_batches is False); "
                             "aggnets.retrieval.extract_descriptors batches padded images for it")
        return BackboneOutput(self(images))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The feature-map size for an input of ``height`` x ``width`` (measured by a forward on the meta device
        is not portable, so this runs a real forward at no-grad on a zero image; cost: one small inference)."""
        out = probe_forward(self, height, width, channels=self.mean.shape[1])
        return int(out.shape[-2]), int(out.shape[-1])

    # ---- freezing -------------------------------------------------------------------------------------------
    def freeze(self, spec: FreezeSpec = True) -> "FeatureExtractor":
        """Freeze all (``True``), up to a module (``"layer2"``) or the listed modules (see the class docstring)."""
        names = self._modules_to_freeze(spec)
        for module_name in names:
            module = self.body.get_submodule(module_name) if module_name else self.body
            module.requires_grad_(False)
        self._frozen_modules = sorted(set(self._frozen_modules) | set(names))
        self.train(self.training)
        return self

    def unfreeze(self) -> "FeatureExtractor":
        """Make every parameter trainable again."""
        self.body.requires_grad_(True)
        self._frozen_modules = []
        self.train(self.training)
        return self

    def _modules_to_freeze(self, spec: FreezeSpec) -> list[str]:
        if spec is None or spec is False:
            return []
        if spec is True or spec == "all":
            return [""]
        if isinstance(spec, str):
            prefix = self._check_module_name(spec)
            order = [name for name, _ in self.body.named_modules() if name]
            last = max(i for i, n in enumerate(order) if n == prefix or n.startswith(prefix + "."))
            # everything registered up to the module, except its ancestors (freezing "blocks" would freeze them all)
            chosen = [n for n in order[: last + 1] if not prefix.startswith(n + ".")]
            return [n for n in chosen if not any(n.startswith(p + ".") for p in chosen)]
        return [self._check_module_name(s) for s in spec]

    def _check_module_name(self, name: str) -> str:
        modules = dict(self.body.named_modules())
        if name not in modules:
            raise ValueError(f"{self.name}: cannot freeze unknown module {name!r}. {close_names(name, modules)}")
        return name

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        if mode:
            for module_name in self._frozen_modules:
                module = self.body.get_submodule(module_name) if module_name else self.body
                for sub in module.modules():
                    if isinstance(sub, _NORM_LAYERS):
                        sub.eval()
        return self

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, layer={self.layer!r}, out_channels={self.out_channels}, stride={self.stride}, "
                f"normalize_images={self.normalize_images}, frozen={self._frozen_modules or None}")
