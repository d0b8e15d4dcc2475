"""torch.compile and TorchScript for every registered head.

* torch.compile: every head is compiled (backend "aot_eager": dynamo + AOTAutograd, the same graph capture and
  backward graph as inductor, without inductor's slow C++ code generation on CPU) and must match eager with and
  without a mask, forward and backward. ``fullgraph=True`` everywhere except where COMPILE_GRAPH_BREAKS says why not;
  the table is checked both ways (a listed head must still break, an unlisted one must not) with
  ``torch._dynamo.explain``. One inductor smoke test compiles a codebook head and GeM for real.
* TorchScript: ``torch.jit.script`` is tried for every head; where it fails (SCRIPT_FAILS, with the reason) the
  head is ``torch.jit.trace``d instead. A traced graph is checked at the traced size, then at another size and with
  another mask: heads in TRACE_SIZE_SPECIFIC / TRACE_MASK_SPECIFIC bake the layout into the trace (checked both ways).

Small sizes (C=8, K=4, 5x6 maps), float64 so that rtol=1e-5 is far above any reordering error.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from .helpers import HEAD_NAMES, assert_close, input_kind, make_head, rand_map

C, K, H, W = 8, 4, 5, 6
RTOL, ATOL = 1e-5, 1e-9

# Heads that cannot be captured as one graph, and why (only with a mask: without one they are fullgraph).
COMPILE_GRAPH_BREAKS = {
    "rmac": "masked: regions are laid out on the bounding box of the valid positions (map_valid_boxes), a "
            "data-dependent crop size read with .item()/bool() -> graph break (no mask: one graph)",
    "spatial_pyramid": "masked: cells are laid out on the bounding box of the valid positions (map_valid_boxes), "
                       "a data-dependent crop size read with .item()/bool() -> graph breaks (no mask: one graph)",
}

_SCRIPT_REASON_CHECK = ("check_feature_map (functional/checks.py) is not TorchScript: tuple(x.shape) / "
                        "type(x).__name__ in f-string error messages")
_SCRIPT_REASON_ANN = ("module attributes annotated under `from __future__ import annotations` (PoolingHead.in_channels:"
                      " int ...) are strings TorchScript cannot resolve: 'Unknown type annotation: int'")
# Every head currently fails torch.jit.script: the shared PoolingHead.forward -> check_feature_map path uses Python
# that TorchScript does not support, so the heads are exported with torch.jit.trace instead.
SCRIPT_FAILS = {
    **{n: _SCRIPT_REASON_CHECK for n in ("bof", "vlad", "netbof", "netvlad", "fisher_vector", "netfv")},
    **{n: _SCRIPT_REASON_ANN for n in ("mac", "spoc", "gem", "crow", "rmac", "spatial_pyramid")},
}
# Traced graphs that are only valid at the traced (H, W): the region / cell layout is computed in Python from H, W.
TRACE_SIZE_SPECIFIC = {"rmac", "spatial_pyramid"}
# Traced graphs that are only valid for the traced mask: the layout is computed from the mask's bounding box.
TRACE_MASK_SPECIFIC = {"rmac", "spatial_pyramid"}


@pytest.fixture(autouse=True, scope="module")
def _dynamo_limits():
    # All heads share PoolingHead.forward: one code object, one recompile per head class / grad mode / mask.
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield
    torch._dynamo.reset()


def _inputs(name, B=2, h=H, w=W, seed=0):
    torch.manual_seed(seed)
    x = rand_map(B, C, h, w, input_kind(name))
    mask = torch.ones(B, h, w, dtype=torch.bool)
    mask[1, h - 2:, :] = False
    mask[1, :, : 1 + seed % 2] = False
    return x, mask


def _head(name):
    torch.manual_seed(1)
    return make_head(name, C, K).eval()


def _grads(head, x, mask):
    x = x.clone().requires_grad_()
    y = head(x, mask)
    if not y.requires_grad:  # hard-assignment BoF / VLAD: piecewise constant in x, nothing to compare
        return y, None
    torch.manual_seed(3)
    y.backward(torch.randn_like(y))
    grads = [x.grad] + [p.grad for p in head.parameters() if p.requires_grad]
    return y, grads


def test_tables_name_registered_heads():
    for table in (COMPILE_GRAPH_BREAKS, SCRIPT_FAILS):
        assert set(table) <= set(HEAD_NAMES)
    assert TRACE_SIZE_SPECIFIC <= set(HEAD_NAMES) and TRACE_MASK_SPECIFIC <= set(HEAD_NAMES)


# --- torch.compile --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", HEAD_NAMES)
def test_compile_matches_eager(name):
    head = _head(name)
    x, mask = _inputs(name)
    fullgraph = name not in COMPILE_GRAPH_BREAKS
    compiled = torch.compile(head, backend="aot_eager", fullgraph=fullgraph)
    with torch.no_grad():  # inference graph (no autograd); the masked path is checked in training mode below
        assert_close(compiled(x), head(x), RTOL, ATOL, f"{name} no mask")
    # Without a mask every head is one graph, also those that break with a mask.
    if not fullgraph:
        with torch.no_grad():
            nomask = torch.compile(head, backend="aot_eager", fullgraph=True)
            assert_close(nomask(x), head(x), RTOL, ATOL, f"{name} no mask, fullgraph")
    for m in (None, mask):
        y_e, g_e = _grads(head, x, m)
        head.zero_grad(set_to_none=True)
        y_c, g_c = _grads(compiled, x, m)
        head.zero_grad(set_to_none=True)
        assert_close(y_c, y_e, RTOL, ATOL, f"{name} train forward mask={m is not None}")
        assert (g_e is None) == (g_c is None)
        if g_e is not None:
            assert len(g_e) == len(g_c)
            for a, b in zip(g_c, g_e):
                assert_close(a, b, RTOL, ATOL, f"{name} backward mask={m is not None}")


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_compile_graph_break_table(name):
    """A head outside COMPILE_GRAPH_BREAKS is one graph with a mask; a listed one still breaks (keep table honest)."""
    head = _head(name)
    x, mask = _inputs(name)
    with torch.no_grad():
        explained = torch._dynamo.explain(head)(x, mask)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    if name in COMPILE_GRAPH_BREAKS:
        assert explained.graph_break_count > 0, f"{name} no longer breaks: move it out of COMPILE_GRAPH_BREAKS"
    else:
        assert explained.graph_break_count == 0, f"{name} graph breaks: {reasons}"


def test_compile_inductor_smoke():
    """Real inductor code generation (C++ on CPU) for a codebook head and GeM, masked, forward + backward."""
    pytest.importorskip("torch._inductor")
    for name in ("netvlad", "gem"):
        head = _head(name)
        x, mask = _inputs(name)
        compiled = torch.compile(head, backend="inductor", fullgraph=True)
        y_e, g_e = _grads(head, x, mask)
        head.zero_grad(set_to_none=True)
        y_c, g_c = _grads(compiled, x, mask)
        head.zero_grad(set_to_none=True)
        assert_close(y_c, y_e, RTOL, ATOL, name)
        for a, b in zip(g_c, g_e):
            assert_close(a, b, RTOL, ATOL, f"{name} backward")


# --- TorchScript ----------------------------------------------------------------------------------------------------

def _trace(head, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated in favour of torch.compile
        return torch.jit.trace(head, args, check_trace=False)


def _matches(fn, head, *args):
    try:
        with torch.no_grad():
            assert_close(fn(*args), head(*args), RTOL, ATOL)
        return True
    except (AssertionError, RuntimeError):
        return False


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_torchscript(name):
    head = _head(name)
    x, mask = _inputs(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            scripted = torch.jit.script(head)
    except Exception as error:  # noqa: BLE001 - TorchScript raises several types
        assert name in SCRIPT_FAILS, f"{name}: torch.jit.script failed and is not in SCRIPT_FAILS: {error}"
    else:
        assert name not in SCRIPT_FAILS, f"{name} scripts now: remove it from SCRIPT_FAILS"
        with torch.no_grad():
            assert_close(scripted(x), head(x), RTOL, ATOL, name)
            assert_close(scripted(x, mask), head(x, mask), RTOL, ATOL, name)
        return

    # Fallback: trace, once without and once with a mask (a traced graph has a fixed signature).
    traced = _trace(head, x)
    traced_masked = _trace(head, x, mask)
    with torch.no_grad():
        assert_close(traced(x), head(x), RTOL, ATOL, f"{name} traced, traced size")
        assert_close(traced_masked(x, mask), head(x, mask), RTOL, ATOL, f"{name} traced with mask, traced size")
        x2, _ = _inputs(name, seed=1)  # same size, new values
        assert_close(traced(x2), head(x2), RTOL, ATOL, f"{name} traced, new values")

    # Another size: a trace is only reusable where the graph does not depend on H, W in Python.
    x3, mask3 = _inputs(name, h=H + 2, w=W - 2, seed=2)
    size_ok = _matches(traced, head, x3) and _matches(traced_masked, head, x3, mask3)
    if name in TRACE_SIZE_SPECIFIC:
        assert not size_ok, f"{name}: trace now generalises to other sizes: remove it from TRACE_SIZE_SPECIFIC"
    else:
        assert size_ok, f"{name}: traced graph is specific to the traced size {H}x{W}"
    # Another mask at the traced size.
    _, mask4 = _inputs(name, seed=1)
    mask4[0, :2, :] = False
    mask_ok = _matches(traced_masked, head, x, mask4)
    if name in TRACE_MASK_SPECIFIC:
        assert not mask_ok, f"{name}: trace now generalises to other masks: remove it from TRACE_MASK_SPECIFIC"
    else:
        assert mask_ok, f"{name}: traced graph is specific to the traced mask"
