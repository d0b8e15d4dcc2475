"""The hand-written backward of the codebook statistics equals plain autograd, and passes gradcheck."""
import itertools

import pytest
import torch

from aggnets.functional import codebook, flatten_positions


@pytest.mark.parametrize("normalize_input,hard,with_squares,masked,bias",
                         list(itertools.product([False, True], repeat=5)))
def test_fast_statistics_match_autograd_and_gradcheck(normalize_input, hard, with_squares, masked, bias):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, 3, 4, generator=generator) > 0.3 if masked else None
    descriptors, valid, _ = flatten_positions(x, mask)
    rows = 10 if with_squares else 5
    weight = torch.randn(4, rows, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    descriptors = descriptors.detach().requires_grad_()
    flags = (normalize_input, hard, with_squares)

    def fast(d, w, bb):
        return codebook._AssignmentStatistics.apply(d, w, bb, valid, *flags)

    def reference(d, w, bb):
        return codebook._statistics_reference(d, w, bb, valid, *flags)

    inputs = (descriptors, weight, b)
    fast_out, reference_out = fast(*inputs), reference(*inputs)
    for got, want in zip(fast_out, reference_out):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    differentiable = [i for i, t in enumerate(reference_out) if t.requires_grad]
    assert [i for i, t in enumerate(fast_out) if t.requires_grad] == differentiable
    cotangents = [torch.randn_like(reference_out[i], generator=generator) for i in differentiable]
    wrt = [t for t in inputs if t is not None]
    got = torch.autograd.grad([fast_out[i] for i in differentiable], wrt, cotangents, allow_unused=True)
    want = torch.autograd.grad([reference_out[i] for i in differentiable], wrt, cotangents, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *args: fast(*args)[1], inputs)


def test_fast_path_is_used_only_when_training():
    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    weight = torch.randn(2, 3)
    with torch.no_grad():
        mass, _ = codebook.assignment_statistics(x.flatten(2), weight, None)
    assert mass.grad_fn is None
    mass, _ = codebook.assignment_statistics(x.flatten(2), weight, None)
    assert type(mass.grad_fn).__name__.startswith("_AssignmentStatistics")
