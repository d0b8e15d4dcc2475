"""Import head weights trained elsewhere, and load our own heads' weights with errors that name the key.

* :func:`netvlad_from_pytorch_netvlad` — a NetVLAD layer in the pytorch-NetVlad layout (Nanne/pytorch-NetVlad and
  the many repositories that copied its ``NetVLAD`` module: ``conv.weight`` (K, C, 1, 1), optional ``conv.bias``
  (K,), ``centroids`` (K, C), usually under ``pool.`` or ``module.pool.``) -> :class:`aggnets.heads.NetVLAD` with
  the same output.
* :func:`gem_from_cirtorch` — the GeM exponent ``pool.p`` of a cnnimageretrieval-pytorch (cirtorch) network ->
  :class:`aggnets.heads.GeM` with the same output.
* :func:`from_reference` — a head from the state dict of its authors' own aggregator module (their key names, e.g.
  MixVPR's ``mix.0.mix.1.weight``), for the heads whose class has a ``from_reference`` classmethod.
* :func:`load_head_state` — ``head.load_state_dict`` whose error lists every missing / unexpected key and every
  shape mismatch (expected and found shapes), and points at the converters when the keys look like those layouts.
* :func:`head_state_keys` / ``HEAD_STATE_KEYS`` — the stable state_dict keys and shapes of every registered head.

Conventions checked against the published code: pytorch-NetVlad's forward is ``x <- normalize(x, dim=C)`` (when
``normalize_input``, its default), ``a = softmax_K(conv(x))``, ``V_k = sum_n a_k(x_n) (x_n - c_k)``, intra-L2 per
cluster, flatten k-major (K, C) -> K * C, L2 — exactly :func:`aggnets.functional.netvlad` with ``intra_norm=True``,
``power=None``. Its ``alpha`` is a plain attribute (only used at initialisation, never saved); ours is a buffer that
the forward pass does not read either. cirtorch's GeM is ``avg_pool2d(x.clamp(min=eps).pow(p), (H, W)).pow(1/p)``
with ``eps=1e-6`` and ``p`` of shape (1,) (``GeMmp``: (C,)) — exactly :class:`aggnets.heads.GeM`; cirtorch's network
then L2-normalises the pooled vector (``normalize=True`` here).

The parameter names of every head have not changed since the heads were first written (git history of
``aggnets/heads``), so there is no older aggnets layout to translate.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .heads import GeM, NetVLAD
from .heads.reference import StateDictError
from .registry import get_head_class, list_heads

__all__ = ["from_reference", "reference_heads", "netvlad_from_pytorch_netvlad", "gem_from_cirtorch",
           "load_head_state", "head_state_keys", "unwrap_state_dict",
           "format_head_state_keys", "HEAD_STATE_KEYS", "StateDictError"]


def reference_heads() -> list[str]:
    """The registered heads that can be built from their authors' state dict (:func:`from_reference`)."""
    return [name for name in list_heads() if callable(getattr(get_head_class(name), "from_reference", None))]


def from_reference(name: str, state_dict: Any, **hparams: Any) -> nn.Module:
    """The aggnets head ``name`` built from the state dict of the authors' own aggregator module (its keys exactly as
    in their repository; a checkpoint dict holding it under ``"state_dict"`` or ``"model_state_dict"`` is unwrapped), with the same output in
    eval mode. ``hparams`` are the constructor arguments the tensors' shapes do not determine; each head's
    ``from_reference`` says which, and its errors name the missing or misshapen key."""
    cls = get_head_class(name)
    build = getattr(cls, "from_reference", None)
    if not callable(build):
        raise ValueError(f"from_reference: {name!r} has no converter from an authors' layout; heads that have one: "
                         f"{', '.join(reference_heads()) or 'none'}")
    return build(dict(unwrap_state_dict(state_dict)), **hparams)


def unwrap_state_dict(state_dict: Any) -> Mapping[str, Any]:
    """Accept a plain state_dict or a checkpoint dict that holds one under ``"state_dict"`` (pytorch-NetVlad,
    cirtorch and Lightning checkpoints), ``"model_state_dict"`` (the deep-visual-geo-localization benchmark) or
    ``"model"``."""
    if isinstance(state_dict, nn.Module):
        return state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    for holder in ("state_dict", "model_state_dict", "model"):
        inner = state_dict.get(holder)
        if isinstance(inner, Mapping):
            return inner
    return state_dict


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else ()


def _find_pair(state_dict: Mapping[str, Any], prefix: Optional[str], first: str, second: str, what: str
               ) -> str:
    """The prefix under which both ``prefix + first`` and ``prefix + second`` exist (auto-detected when ``prefix``
    is None or empty and the bare names are absent); errors name the keys looked for and what was found."""
    if prefix:
        for candidate in (prefix, prefix + "."):
            if candidate + first in state_dict and candidate + second in state_dict:
                return candidate
        missing = [k for k in (prefix + first, prefix + second) if k not in state_dict]
        raise StateDictError(f"{what}: prefix {prefix!r}: missing key(s) {missing}; keys under that prefix: "
                             f"{sorted(k for k in state_dict if k.startswith(prefix))[:20]}")
    prefixes = [k[: -len(first)] for k in state_dict if isinstance(k, str) and k.endswith(first)]
    prefixes = [p for p in prefixes if (p == "" or p.endswith(".")) and p + second in state_dict]
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        firsts = sorted(k for k in state_dict if isinstance(k, str) and k.endswith(first))
        seconds = sorted(k for k in state_dict if isinstance(k, str) and k.endswith(second))
        raise StateDictError(f"{what}: no '<prefix>{first}' / '<prefix>{second}' pair in the state_dict "
                             f"(keys ending in {first!r}: {firsts[:10]}; keys ending in {second!r}: {seconds[:10]})")
    raise StateDictError(f"{what}: ambiguous, several '<prefix>{first}' / '<prefix>{second}' pairs with prefixes "
                         f"{sorted(prefixes)}; pass prefix= to choose one")


def netvlad_from_pytorch_netvlad(state_dict: Any, prefix: str = "", normalize_input: bool = True,
                                 **kwargs: Any) -> NetVLAD:
    """Build a :class:`~aggnets.heads.NetVLAD` from a pytorch-NetVlad-layout state_dict, with the same output.

    ``state_dict``: the layer's or the whole network's state_dict (or a checkpoint dict holding it under
    ``"state_dict"``). Keys ``<prefix>conv.weight`` (K, C, 1, 1), optional ``<prefix>conv.bias`` (K,) (absent for
    ``vladv2=False``), ``<prefix>centroids`` (K, C); ``prefix`` (e.g. ``"pool."``, ``"module.pool."``) is
    auto-detected when it is the only such pair. ``normalize_input`` must match the trained layer (default True, as
    there). Other keyword arguments go to ``NetVLAD`` (e.g. ``alpha`` for the record); the head takes the
    centroids' dtype. ``conv.weight`` -> ``assign.weight``, ``conv.bias`` -> ``assign.bias``, ``centroids`` ->
    ``centroids``.
    """
    state_dict = unwrap_state_dict(state_dict)
    what = "netvlad_from_pytorch_netvlad"
    found = _find_pair(state_dict, prefix, "conv.weight", "centroids", what)
    weight_key, bias_key, centroids_key = found + "conv.weight", found + "conv.bias", found + "centroids"
    weight, centroids = state_dict[weight_key], state_dict[centroids_key]
    bias = state_dict.get(bias_key)
    if not isinstance(centroids, Tensor) or centroids.dim() != 2 or 0 in centroids.shape:
        raise StateDictError(f"{what}: {centroids_key!r} must be a (K, C) tensor, found shape {_shape(centroids)}")
    k, c = centroids.shape
    if not isinstance(weight, Tensor) or _shape(weight) not in ((k, c, 1, 1), (k, c)):
        raise StateDictError(f"{what}: {weight_key!r} must have shape {(k, c, 1, 1)} to match {centroids_key!r} "
                             f"{(k, c)}, found shape {_shape(weight)}")
    if bias is not None and _shape(bias) != (k,):
        raise StateDictError(f"{what}: {bias_key!r} must have shape {(k,)}, found shape {_shape(bias)}")
    kwargs.setdefault("intra_norm", True)
    kwargs.setdefault("power", None)
    head = NetVLAD(c, k, normalize_input=normalize_input, bias=bias is not None, **kwargs)
    head = head.to(dtype=centroids.dtype if centroids.is_floating_point() else torch.get_default_dtype())
    ours = {"assign.weight": weight.detach().reshape(k, c, 1, 1), "centroids": centroids.detach(),
            "alpha": head.alpha.detach().clone()}
    if bias is not None:
        ours["assign.bias"] = bias.detach()
    head.load_state_dict(ours)
    return head


def gem_from_cirtorch(state_dict: Any, prefix: Optional[str] = None, in_channels: Optional[int] = None, *,
                      eps: float = 1e-6, normalize: bool = False, learn_p: bool = True) -> GeM:
    """Build a :class:`~aggnets.heads.GeM` from a cnnimageretrieval-pytorch (cirtorch) state_dict, same output.

    Reads ``<prefix>p`` (cirtorch: ``pool.p``, shape (1,); ``GeMmp``: shape (C,)); ``prefix`` is auto-detected
    (``pool.``, ``module.pool.``, or a bare ``p``) when None. ``in_channels``: the backbone's output channels; when
    None it comes from a per-channel ``p``, the checkpoint's ``meta["outputdim"]``, or ``whiten.weight`` (D, C).
    ``normalize=True`` adds the L2 normalisation that cirtorch's ``ImageRetrievalNet`` applies after pooling.
    """
    meta = state_dict.get("meta") if isinstance(state_dict, Mapping) else None
    state_dict = unwrap_state_dict(state_dict)
    what = "gem_from_cirtorch"
    if prefix is not None:
        candidates = [k for k in (prefix + "p", prefix + ".p") if k in state_dict]
        if not candidates:
            raise StateDictError(f"{what}: missing key {prefix + 'p'!r}; keys under prefix {prefix!r}: "
                                 f"{sorted(k for k in state_dict if k.startswith(prefix))[:20]}")
    else:
        candidates = [k for k in state_dict if isinstance(k, str) and (k == "p" or k.endswith("pool.p"))]
        if not candidates:
            raise StateDictError(f"{what}: no GeM exponent 'pool.p' (or 'p') in the state_dict; "
                                 f"keys ending in '.p': {sorted(k for k in state_dict if str(k).endswith('.p'))[:10]}")
        if len(candidates) > 1:
            raise StateDictError(f"{what}: ambiguous, several GeM exponents {sorted(candidates)}; pass prefix=")
    key = candidates[0]
    p = state_dict[key]
    if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() == 0:
        raise StateDictError(f"{what}: {key!r} must have shape (1,) or (C,), found shape {_shape(p)}")
    if in_channels is None:
        if p.numel() > 1:
            in_channels = p.numel()
        elif isinstance(meta, Mapping) and "outputdim" in meta:
            in_channels = int(meta["outputdim"])
        elif "whiten.weight" in state_dict and len(_shape(state_dict["whiten.weight"])) == 2:
            in_channels = _shape(state_dict["whiten.weight"])[1]
        else:
            raise ValueError(f"{what}: {key!r} has shape (1,), pass in_channels= (the backbone's output channels)")
    if p.numel() > 1 and p.numel() != in_channels:
        raise StateDictError(f"{what}: {key!r} has shape {_shape(p)}, expected (1,) or ({in_channels},) for "
                             f"in_channels={in_channels}")
    head = GeM(int(in_channels), per_channel=p.numel() > 1, learn_p=learn_p, eps=eps, normalize=normalize)
    head = head.to(dtype=p.dtype if p.is_floating_point() else torch.get_default_dtype())
    head.load_state_dict({"p": p.detach()})
    return head


def _layout_hints(head: nn.Module, keys: set[str]) -> list[str]:
    hints = []
    if any(k.endswith("conv.weight") for k in keys) and any(k.endswith("centroids") for k in keys):
        hints.append("the keys look like the pytorch-NetVlad layout (conv.weight / conv.bias / centroids): build "
                     "the head with aggnets.convert.netvlad_from_pytorch_netvlad(state_dict)")
    if any(k.endswith("pool.p") for k in keys) and any(k.startswith(("features.", "module.features.")) for k in keys):
        hints.append("the keys look like a cnnimageretrieval-pytorch (cirtorch) network (features.* / pool.p): build "
                     "the head with aggnets.convert.gem_from_cirtorch(state_dict, in_channels=...)")
    expected = set(head.state_dict())
    if expected and not expected & keys:
        for k in keys:
            for e in expected:
                if k.endswith("." + e):
                    prefix = k[: -len(e)]
                    if expected <= {x[len(prefix):] for x in keys if x.startswith(prefix)}:
                        hints.append(f"the keys are under the prefix {prefix!r}: pass prefix={prefix!r}")
                        return hints
    return hints


def load_head_state(head: nn.Module, state_dict: Any, strict: bool = True, prefix: str = ""):
    """``head.load_state_dict(state_dict, strict)`` with an error that names every problem.

    Only the keys under ``prefix`` are used (e.g. ``prefix="head."`` for an :class:`aggnets.Embedder`'s
    state_dict), with the prefix removed. A checkpoint dict holding the weights under ``"state_dict"`` is unwrapped.
    Raises :class:`StateDictError` listing the missing and unexpected keys (when ``strict``) and the shape
    mismatches (always) with the expected and found shapes, plus a hint at :func:`netvlad_from_pytorch_netvlad` /
    :func:`gem_from_cirtorch` when the keys look like those layouts. Returns torch's ``(missing_keys,
    unexpected_keys)`` result.
    """
    state_dict = unwrap_state_dict(state_dict)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    expected = head.state_dict()
    keys = set(state_dict)
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(k for k in keys if k not in expected)
    mismatched = [(k, tuple(expected[k].shape), _shape(state_dict[k])) for k in expected
                  if k in keys and tuple(expected[k].shape) != _shape(state_dict[k])]
    problems = []
    if strict:
        problems += [f"missing key {k!r} (expected shape {tuple(expected[k].shape)})" for k in missing]
        problems += [f"unexpected key {k!r} (found shape {_shape(state_dict[k])})" for k in unexpected]
    problems += [f"shape mismatch for {k!r}: expected {e}, found {f}" for k, e, f in mismatched]
    if problems:
        name = type(head).__name__
        lines = [f"cannot load the state_dict into {name}:", *(f"  - {p}" for p in problems)]
        lines += [f"  hint: {h}" for h in _layout_hints(head, keys)]
        lines.append(f"  {name} expects: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in expected.items()))
        raise StateDictError("\n".join(lines))
    return head.load_state_dict(dict(state_dict), strict=strict)


# --- the stable key table -------------------------------------------------------------------------------------------

_C, _K = 11, 6                     # sizes no head uses for a fixed dimension (kernels 3, 5, 7), so shapes read symbolically
_SPECIAL = {"spatial_pyramid": {"head": "netvlad", "levels": (1, 2), "head_kwargs": {"num_clusters": _K}}}


def _example_head(name: str) -> nn.Module:
    cls = get_head_class(name)
    kwargs = dict(_SPECIAL.get(name, {}))
    kwargs["in_channels"] = _C
    if "num_clusters" in inspect.signature(cls.__init__).parameters:
        kwargs["num_clusters"] = _K
    return cls(**kwargs)


def _symbolic(size: int) -> Any:
    for n, sym in ((_C, "C"), (_K, "K"), (2 * _C, "2C"), (_K * _C, "K*C")):
        if size == n:
            return sym
    return size


def head_state_keys(name: Optional[str] = None) -> dict:
    """``{head name: {state_dict key: shape}}`` for every registered head (or ``{key: shape}`` for one), read from
    heads built with small sizes; ``C`` = in_channels, ``K`` = num_clusters (``spatial_pyramid`` shown wrapping a
    NetVLAD). These names are stable: the tests pin them. Does not touch the global RNG."""
    names = list_heads() if name is None else [name]
    table = {}
    with torch.random.fork_rng(devices=[]):
        for n in names:
            head = _example_head(n)
            table[n] = {k: tuple(_symbolic(s) for s in v.shape) for k, v in head.state_dict().items()}
    return table if name is None else table[name]


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def format_head_state_keys(table: Optional[dict] = None) -> str:
    """The key table as Markdown (for the README)."""
    table = head_state_keys() if table is None else table
    rows = ["| head | state_dict keys (shape) |", "|---|---|"]
    for n, keys in table.items():
        cells = ", ".join(f"`{k}` {_fmt_shape(s)}" for k, s in keys.items()) or "(no state)"
        rows.append(f"| {n} | {cells} |")
    return "\n".join(rows)


def __getattr__(name: str) -> Any:
    if name == "HEAD_STATE_KEYS":        # computed on first access (builds every head once)
        value = head_state_keys()
        globals()["HEAD_STATE_KEYS"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
