"""torch.compile and TorchScript for every registered head.

* torch.compile: every head is compiled (backend "aot_eager": dynamo + AOTAutograd, the same graph capture and
  backward graph as inductor, without inductor's slow C++ code generation on CPU) and must match eager with and
  without a mask, forward and backward. ``fullgraph=True`` everywhere except for heads that declare
  ``capabilities.fullgraph = False`` (their masked form reads the mask's layout in Python); the declaration is
  checked both ways (such a head must still break, another must not) with ``torch._dynamo.explain``. One inductor
  smoke test compiles a codebook head and GeM for real.
* TorchScript: ``torch.jit.script`` is tried for every head. A scripted head must match eager with and without a
  mask, forward and backward (input and parameter gradients), then at another size and with another mask (nothing
  is baked in), raise the eager error messages, and survive ``torch.jit.save`` / ``torch.jit.load``. Where scripting
  fails (heads declaring ``capabilities.scriptable = False``; checked both ways; NOT_SCRIPTABLE_BECAUSE says why for
  the seed heads) the head is ``torch.jit.trace``d instead. A traced graph is
  checked at the traced size, then at another size and with another mask: heads in TRACE_SIZE_SPECIFIC /
  TRACE_MASK_SPECIFIC bake the layout into the trace (checked both ways).

Small sizes (C=8, K=4, 5x6 maps), float64 so that rtol=1e-5 is far above any reordering error.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from .helpers import ANY_SIZE, HEAD_NAMES, MASKED, assert_close, capabilities, input_kind, make_head, rand_map

C, K, H, W = 8, 4, 5, 6
RTOL, ATOL = 1e-5, 1e-9

# Why the seed heads declare fullgraph=False / scriptable=False (documentation of their declarations).
GRAPH_BREAKS_BECAUSE = {
    "rmac": "masked: regions are laid out on the bounding box of the valid positions (map_valid_boxes), a "
            "data-dependent crop size read with .item()/bool() -> graph break (no mask: one graph)",
    "spatial_pyramid": "masked: cells are laid out on the bounding box of the valid positions (map_valid_boxes), "
                       "a data-dependent crop size read with .item()/bool() -> graph breaks (no mask: one graph)",
}
_SCRIPT_REASON_BOXES = ("with a mask, pool() calls map_valid_boxes (functional/masking.py), which takes a Python "
                        "callable (a bound method) and groups the images by their valid box in a dict of Python "
                        "tuples: TorchScript has no first-class functions")
NOT_SCRIPTABLE_BECAUSE = {
    "rmac": "the region code (functional/regions.py) is not in the TorchScript subset (first error: rmac's f-string "
            "uses {pool!r}, 'Don't support conversion in JoinedStr'; it and RMAC.pool also call "
            "torch.compiler.is_exporting(), see spatial_pyramid); beyond that, " + _SCRIPT_REASON_BOXES,
    "spatial_pyramid": "the cell layout (functional/pyramid.py, regions.py) calls torch.compiler.is_exporting(), which "
                       "returns a Python global TorchScript cannot compile ('python value of type bool cannot be used "
                       "as a value'), and builds the cells from Python lists of bounds; beyond that, "
                       + _SCRIPT_REASON_BOXES,
}
BREAKS = {n for n in HEAD_NAMES if not capabilities(n).fullgraph}
NOT_SCRIPTABLE = {n for n in HEAD_NAMES if not capabilities(n).scriptable}
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
    """(x, mask); the mask is None for a head that takes none (it must refuse one: tests/test_capabilities.py)."""
    torch.manual_seed(seed)
    x = rand_map(B, C, h, w, input_kind(name))
    mask = torch.ones(B, h, w, dtype=torch.bool)
    mask[1, h - 2:, :] = False
    mask[1, :, : 1 + seed % 2] = False
    return x, mask if name in MASKED else None


def _head(name):
    torch.manual_seed(1)
    return make_head(name, C, K, size=(H, W)).eval()


def _grads(head, x, mask):
    x = x.clone().requires_grad_()
    y = head(x, mask)
    if not y.requires_grad:  # hard-assignment BoF / VLAD: piecewise constant in x, nothing to compare
        return y, None
    torch.manual_seed(3)
    y.backward(torch.randn_like(y))
    grads = [x.grad] + [p.grad for p in head.parameters() if p.requires_grad]
    return y, grads


def _assert_same_as_eager(head, other, x, masks, label, rtol=RTOL, atol=ATOL):
    """``other`` (compiled / scripted ``head``) gives eager's output and gradients for every mask in ``masks``."""
    for m in masks:
        y_e, g_e = _grads(head, x, m)
        head.zero_grad(set_to_none=True)
        y_o, g_o = _grads(other, x, m)
        head.zero_grad(set_to_none=True)
        other.zero_grad(set_to_none=True)
        assert_close(y_o, y_e, rtol, atol, f"{label} forward mask={m is not None}")
        assert (g_e is None) == (g_o is None)
        if g_e is not None:
            assert len(g_e) == len(g_o)
            for a, b in zip(g_o, g_e):
                assert_close(a, b, rtol, atol, f"{label} backward mask={m is not None}")


def test_tables_name_registered_heads():
    assert set(GRAPH_BREAKS_BECAUSE) <= BREAKS and set(NOT_SCRIPTABLE_BECAUSE) <= NOT_SCRIPTABLE
    assert TRACE_SIZE_SPECIFIC <= NOT_SCRIPTABLE and TRACE_MASK_SPECIFIC <= NOT_SCRIPTABLE


# --- torch.compile --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", HEAD_NAMES)
def test_compile_matches_eager(name):
    head = _head(name)
    x, mask = _inputs(name)
    fullgraph = name not in BREAKS
    compiled = torch.compile(head, backend="aot_eager", fullgraph=fullgraph)
    with torch.no_grad():  # inference graph (no autograd); the masked path is checked in training mode below
        assert_close(compiled(x), head(x), RTOL, ATOL, f"{name} no mask")
    # Without a mask every head is one graph, also those that break with a mask.
    if not fullgraph:
        with torch.no_grad():
            nomask = torch.compile(head, backend="aot_eager", fullgraph=True)
            assert_close(nomask(x), head(x), RTOL, ATOL, f"{name} no mask, fullgraph")
    _assert_same_as_eager(head, compiled, x, (None, mask), f"{name} compiled")


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_compile_graph_break_table(name):
    """A head declaring fullgraph is one graph with a mask; one declaring it is not still breaks (keep it honest)."""
    head = _head(name)
    x, mask = _inputs(name)
    with torch.no_grad():
        explained = torch._dynamo.explain(head)(x, mask)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    if name in BREAKS:
        assert explained.graph_break_count > 0, f"{name} no longer breaks: declare capabilities.fullgraph = True"
    else:
        assert explained.graph_break_count == 0, f"{name} graph breaks: {reasons}"


def test_compile_inductor_smoke():
    """Real inductor code generation (C++ on CPU) for a codebook head and GeM, masked, forward + backward."""
    pytest.importorskip("torch._inductor")
    for name in ("netvlad", "gem"):
        head = _head(name)
        x, mask = _inputs(name)
        compiled = torch.compile(head, backend="inductor", fullgraph=True)
        _assert_same_as_eager(head, compiled, x, (mask,), f"{name} inductor")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_compile_inductor_cuda_matches_eager(name):
    """Every head through inductor's Triton code on the GPU, with a mask, forward + backward (float32)."""
    head = _head(name).cuda().float()
    x, mask = _inputs(name)
    x, mask = x.cuda().float(), mask.cuda()
    compiled = torch.compile(head, backend="inductor", fullgraph=name not in BREAKS)
    _assert_same_as_eager(head, compiled, x, (None, mask), f"{name} cuda", rtol=1e-4, atol=1e-5)


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


def _script(head):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(head)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_torchscript(name):
    head = _head(name)
    try:
        scripted = _script(head)
    except Exception as error:  # noqa: BLE001 - TorchScript raises several types
        assert name in NOT_SCRIPTABLE, f"{name}: torch.jit.script failed but the head declares scriptable: {error}"
        _check_trace(name, head)
    else:
        assert name not in NOT_SCRIPTABLE, f"{name} scripts now: declare capabilities.scriptable = True"
        _check_scripted(name, head, scripted)


def _check_scripted(name, head, scripted):
    """Forward and backward equal eager, with and without a mask; then other sizes and masks (nothing baked in)."""
    assert [n for n, _ in scripted.named_parameters()] == [n for n, _ in head.named_parameters()]
    x, mask = _inputs(name)
    _assert_same_as_eager(head, scripted, x, (None, mask), f"{name} scripted")
    cases = [(x,)]
    if name in ANY_SIZE:  # a fixed-size head takes (and is checked at) its own size only
        x3, mask3 = _inputs(name, h=H + 2, w=W - 2, seed=2)
        cases += [(x3,), (x3, mask3)]
    if mask is not None:
        _, mask4 = _inputs(name, seed=1)
        mask4[0, :2, :] = False
        cases += [(x, mask4), (x, mask)]
    with torch.no_grad():
        for _ in range(3):  # the profiling executor re-optimises the graph after the first runs
            for args in cases:
                assert_close(scripted(*args), head(*args), RTOL, ATOL, f"{name} scripted, {tuple(args[0].shape)}")


def test_torchscript_int_hyperparameters():
    """Float options given as Python ints (a=2, power=1, ...) still script, to the eager values."""
    from aggnets import heads as AH

    torch.manual_seed(0)
    x = rand_map(2, C, H, W, "positive")
    for head in (AH.CroW(C, a=2, b=3, eps=0), AH.GeM(C, eps=0), AH.NetVLAD(C, K, power=2), AH.NetFV(C, K, power=1)):
        head = head.double().eval()
        with torch.no_grad():
            assert_close(_script(head)(x), head(x), RTOL, ATOL, type(head).__name__)


@pytest.mark.parametrize("name", ["netvlad", "gem"])
def test_torchscript_checks_inputs(name):
    """A scripted head validates its input like the eager one, with the same message (raised as a
    ``torch.jit.Error`` naming ``builtins.ValueError``)."""
    head = _head(name)
    scripted = _script(head)
    x, mask = _inputs(name)
    all_false = mask.clone()
    all_false[1] = False
    for args in ((x[:, :-1],), (x[:, :, :, 0],), (x, mask[:, :-1]), (x, all_false)):
        with pytest.raises(ValueError) as eager:
            head(*args)
        with pytest.raises((ValueError, torch.jit.Error), match="ValueError") as script:
            scripted(*args)
        assert str(eager.value) in str(script.value)


@pytest.mark.parametrize("name", ["netvlad", "gem"])
def test_torchscript_save_load(name, tmp_path):
    """A scripted head round-trips through torch.jit.save / torch.jit.load to identical outputs."""
    head = _head(name)
    scripted = _script(head)
    path = tmp_path / f"{name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save / load are deprecated
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path))
    x, mask = _inputs(name)
    x3, mask3 = _inputs(name, h=H + 2, w=W - 2, seed=2)
    with torch.no_grad():
        for args in ((x,), (x, mask), (x3, mask3)):
            assert torch.equal(loaded(*args), scripted(*args)), f"{name} {tuple(args[0].shape)}"
            assert_close(loaded(*args), head(*args), RTOL, ATOL, name)


def _check_trace(name, head):
    """The fallback for heads that do not script: a traced graph, and what it bakes in (checked both ways)."""
    x, mask = _inputs(name)
    # Trace once without and once with a mask (a traced graph has a fixed signature).
    traced = _trace(head, x)
    traced_masked = _trace(head, x, mask) if mask is not None else traced
    with torch.no_grad():
        assert_close(traced(x), head(x), RTOL, ATOL, f"{name} traced, traced size")
        if mask is not None:
            assert_close(traced_masked(x, mask), head(x, mask), RTOL, ATOL, f"{name} traced with mask, traced size")
        x2, _ = _inputs(name, seed=1)  # same size, new values
        assert_close(traced(x2), head(x2), RTOL, ATOL, f"{name} traced, new values")
    if name not in ANY_SIZE or mask is None:
        return  # the rest checks what a trace bakes in of the size and the mask

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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("name", [n for n in HEAD_NAMES if n not in NOT_SCRIPTABLE])
def test_torchscript_cuda(name):
    head = _head(name).cuda()
    x, mask = _inputs(name)
    x, mask = x.cuda(), mask.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(head)
    with torch.no_grad():
        assert_close(scripted(x), head(x), RTOL, ATOL, name)
        assert_close(scripted(x, mask), head(x, mask), RTOL, ATOL, name)
