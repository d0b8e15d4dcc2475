"""The CPU dropout behind SALAD's token MLPs (aggnets.functional.dropout) against the facts of inverted dropout:
each element dropped independently with probability q (p rounded to 16 bits), the survivors scaled by 1 / (1 - q)
so that the expectation is the input, the ReLU's gradient only where a unit survived and was positive; checked by
counting over a million draws (binomial bounds of 5 standard deviations)."""
import math

import pytest
import torch
import torch.nn.functional as F

from aggnets.functional import dropout_keep, relu_dropout

N = 1 << 20


def _within(count, total, prob, sigmas=5.0):
    return abs(count - total * prob) <= sigmas * math.sqrt(total * prob * (1.0 - prob))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_each_element_is_dropped_with_probability_q(p):
    torch.manual_seed(0)
    keep, q = dropout_keep(torch.empty(N), p)
    assert q == round(p * 65536) / 65536 and abs(q - p) <= 2.0 ** -17
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert _within(int((keep == 0).sum()), N, q)


def test_the_masks_of_neighbouring_elements_are_independent():
    """Four masks come from each 64-bit word: every lane has the rate q and every pair of lanes the rate q^2."""
    torch.manual_seed(1)
    keep, q = dropout_keep(torch.empty(N), 0.3)
    lanes = (keep == 0).reshape(-1, 4)
    for lane in range(4):
        assert _within(int(lanes[:, lane].sum()), N // 4, q)
    for a in range(4):
        for b in range(a + 1, 4):
            assert _within(int((lanes[:, a] & lanes[:, b]).sum()), N // 4, q * q)
    assert _within(int((lanes[:-1, 3] & lanes[1:, 0]).sum()), N // 4 - 1, q * q)  # across words


def test_the_mask_takes_the_shape_and_dtype_and_follows_the_seed():
    like = torch.empty(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(2)
    first, _ = dropout_keep(like, 0.5)
    torch.manual_seed(2)
    again, _ = dropout_keep(like, 0.5)
    other, _ = dropout_keep(like, 0.5)
    assert first.shape == like.shape and first.dtype == torch.bfloat16
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_relu_dropout_is_unbiased_and_its_gradient_flows_through_the_survivors():
    torch.manual_seed(3)
    h = torch.randn(N, dtype=torch.float64)
    leaf = h.clone().requires_grad_()
    r, s = relu_dropout(leaf.clone(), 0.3, True)
    q = 1.0 - 1.0 / s
    assert abs(q - 0.3) <= 2.0 ** -17
    survived = r > 0
    assert torch.equal(r[survived], h[survived])                                  # r = ReLU(k h), unscaled
    assert bool((h[~survived & (r == 0)] != 0).any())                             # dropped positives exist
    assert _within(int((survived).sum()), int((h > 0).sum()), 1.0 - q)
    mean = float((s * r).detach().sum() / F.relu(h).sum())                              # E[s k ReLU(h)] = ReLU(h)
    assert abs(mean - 1.0) < 5.0 * math.sqrt(q / (1.0 - q)) * float(F.relu(h).norm() / F.relu(h).sum())
    (s * r).sum().backward()
    expected = survived.to(torch.float64) * s
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_eval_mode_and_no_dropout_are_the_relu_and_p_near_one_falls_back():
    h = torch.randn(100)
    for training, p in ((False, 0.3), (True, 0.0)):
        r, s = relu_dropout(h.clone(), p, training)
        assert s == 1.0 and torch.equal(r, F.relu(h))
    r, s = relu_dropout(h.clone(), 1.0, True)
    assert s == 1.0 and torch.equal(r, torch.zeros(100))
    with pytest.raises(ValueError, match="p must lie in"):
        dropout_keep(h, 1.0)
