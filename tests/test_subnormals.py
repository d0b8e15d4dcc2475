"""No subnormal float reaches a matrix product in the soft-assignment heads (NetVLAD and its GhostVLAD / SuperVLAD
options, CRN, NetBoF, NetFV).

Why: MKL's GEMM on Intel cores slows down ~100x on subnormal operands (|v| < 2^-126 ~ 1.18e-38), and a soft
assignment is full of them (~15 % of NetFV's posteriors at GMM initialisation). This machine may not stall, so the
test does not time anything: a ``TorchDispatchMode`` inspects every GEMM-family op (mm, bmm, addmm, baddbmm, matmul,
addbmm and their out variants) of a forward + backward on a realistic input and records each float32 / bfloat16
operand that holds a nonzero value below the smallest normal number. The heads are initialised as training does: a
GMM fitted to the features (NetFV), k-means with ``alpha="auto"`` (NetVLAD, NetBoF).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aggnets.heads import CRN, NetBoF, NetFV, NetVLAD

aten = torch.ops.aten
GEMMS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.addbmm}
TINY = torch.finfo(torch.float32).tiny  # 1.1754944e-38, the smallest normal float32 (bfloat16: the same)

B, C, H, W, K = 2, 256, 14, 14, 64


class SubnormalGemmOperands(TorchDispatchMode):
    """Records (op, operand shape, number of subnormal values, operand size) for every float32 / bfloat16 operand of a
    GEMM-family op that holds a nonzero value with magnitude below 2^-126."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, tuple, int, int]] = []
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in GEMMS:
            self.gemms += 1
            operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if func._overloadname == "out" or "out" in kwargs:  # the out= tensor is written, not read
                operands = [a for a in args if isinstance(a, torch.Tensor)]
            for operand in operands:
                if operand.dtype in (torch.float32, torch.bfloat16) and operand.numel():
                    magnitude = operand.detach().abs()
                    count = int(((magnitude < TINY) & (magnitude > 0)).sum())
                    if count:
                        self.found.append((str(func), tuple(operand.shape), count, operand.numel()))
        return func(*args, **kwargs)

    def summary(self) -> str:
        total = sum(f[2] for f in self.found)
        lines = [f"  {op} operand {shape}: {count} subnormal of {size} ({100.0 * count / size:.2f} %)"
                 for op, shape, count, size in self.found]
        return f"{len(self.found)} GEMM operands with {total} subnormal values (of {self.gemms} GEMMs):\n" + \
            "\n".join(lines)


def realistic_maps(n: int, seed: int) -> torch.Tensor:
    """Sparse positive maps like a CNN's post-ReLU activations: a few smooth latent factors mixed into C channels,
    noise, a negative offset, ReLU (about 30 % of the values are positive)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 16, H // 2, W // 2, generator=g)
    latent = torch.nn.functional.interpolate(latent, size=(H, W), mode="bilinear", align_corners=False)
    mixing = torch.randn(C, 16, generator=torch.Generator().manual_seed(1234)) / 4.0
    pre = torch.einsum("cl,blhw->bchw", mixing, latent) + 0.5 * torch.randn(n, C, H, W, generator=g) - 0.5
    return torch.relu(pre)


def sampled_descriptors(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])


_HEADS: dict[str, torch.nn.Module] = {}


def build(name: str) -> torch.nn.Module:
    """The head initialised from features of 16 other images, as training initialises it (cached per name)."""
    if name not in _HEADS:
        torch.manual_seed(0)
        descriptors = sampled_descriptors(realistic_maps(16, seed=1))
        if name == "netfv":
            head = NetFV(C, K)
        elif name == "netvlad":
            head = NetVLAD(C, K)
        elif name == "ghostvlad":
            head = NetVLAD(C, K, ghost_clusters=2)
        elif name == "supervlad":
            head = NetVLAD(C, 4, ghost_clusters=1, residual=False)
        elif name in ("crn", "netvlad_sharp"):
            head = CRN(C, K) if name == "crn" else NetVLAD(C, K)
        else:
            head = NetBoF(C, K)
        if name == "netfv":
            head.init_from_descriptors(descriptors, seed=0)
        elif name in ("crn", "netvlad_sharp"):
            # a sharper assignment than alpha="auto" gives (~47 here; training sharpens it): without the flush, its
            # soft-max and logit gradients hold subnormals on this input
            head.init_from_descriptors(descriptors, alpha=300.0, seed=0)
        else:
            head.init_from_descriptors(descriptors, alpha="auto", seed=0)
        _HEADS[name] = head
    return _HEADS[name]


HEADS = ["netfv", "netvlad", "netvlad_sharp", "netbof", "ghostvlad", "supervlad", "crn"]


def run(head: torch.nn.Module, mode: str) -> SubnormalGemmOperands:
    x = realistic_maps(B, seed=2)
    cotangent = torch.randn(B, head.out_dim, generator=torch.Generator().manual_seed(3))
    recorder = SubnormalGemmOperands()
    if mode == "train":  # the hand-written backward (NetVLAD, NetFV) / autograd with the flushed softmax (NetBoF)
        x.requires_grad_()
        with recorder:
            y = head(x)
            y.backward(cotangent)
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    elif mode == "inference":  # the plain-autograd path without gradients
        with torch.no_grad(), recorder:
            head(x)
    elif mode == "autocast":  # the plain-autograd path, forward and backward, under CPU autocast (bfloat16)
        x.requires_grad_()
        with recorder:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = head(x)
            y.float().backward(cotangent)
    elif mode == "script":  # TorchScript (inference)
        scripted = torch.jit.script(head)
        with torch.no_grad(), recorder:
            scripted(x)
    head.zero_grad(set_to_none=True)
    assert recorder.gemms > 0
    return recorder


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
@pytest.mark.parametrize("mode", ["train", "inference", "autocast", "script"])
@pytest.mark.parametrize("name", HEADS)
def test_no_subnormal_gemm_operand(name, mode):
    recorder = run(build(name), mode)
    assert not recorder.found, f"{name} ({mode}): " + recorder.summary()


def test_the_input_is_one_that_produces_subnormal_posteriors():
    """The NetFV posteriors of this input really contain subnormals before any flush (so the test above means
    something): computed here without aggnets' assignment code."""
    head = build("netfv")
    x = sampled_descriptors(realistic_maps(B, seed=2)).double()
    with torch.no_grad():
        variances = head.log_vars.double().exp()
        log_p = (torch.log_softmax(head.log_weights.double(), 0)
                 - 0.5 * (((x[:, None, :] - head.means.double()) ** 2 / variances).sum(-1)
                          + variances.log().sum(-1) + C * math.log(2 * math.pi)))
        posteriors = torch.softmax(log_p, dim=1).float()
    fraction = float(((posteriors > 0) & (posteriors < TINY)).double().mean())
    assert fraction > 0.001, fraction


# ---- the helper ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flush_tiny_zeroes_only_negligible_values(dtype):
    from aggnets.functional.precision import flush_tiny, tiny_threshold
    threshold = tiny_threshold(dtype)
    assert threshold == (2.0 ** -1000 if dtype == torch.float64 else 2.0 ** -100)
    smallest_normal = torch.finfo(dtype).tiny
    values = torch.tensor([0.0, -0.0, 1.0, -0.25, 1e-20, -1e-20, threshold, -threshold, threshold / 2, -threshold / 2,
                           smallest_normal, smallest_normal / 4, -smallest_normal / 4, float("inf"), float("-inf"),
                           float("nan")], dtype=dtype)
    flushed = flush_tiny(values)
    assert flushed.dtype == dtype and flushed.shape == values.shape
    kept = values.abs() > threshold
    assert torch.equal(flushed[kept], values[kept])  # incl. +-inf and 1e-20
    assert bool((flushed[~kept & ~values.isnan()] == 0).all())
    assert bool(flushed[-1].isnan())
    subnormals = flushed[(values != 0) & (values.abs() < smallest_normal)]
    assert subnormals.numel() == 2 and bool((subnormals == 0).all())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_flush_tiny_gradient_scripting_and_no_change_to_sums():
    from aggnets.functional.precision import flush_tiny
    x = torch.tensor([1.0, 2.0 ** -110, -3.0, -(2.0 ** -101), 2.0 ** -99], requires_grad=True)
    flush_tiny(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    scripted = torch.jit.script(flush_tiny)
    y = torch.randn(3, 7, 5).softmax(dim=1) * torch.tensor([1.0, 1e-32, 1e-45]).view(3, 1, 1)
    assert torch.equal(scripted(y), flush_tiny(y))
    assert int((flush_tiny(y)[1:] != 0).sum()) == 0
    # a softmax column keeps its sum to the last bit: what is dropped is < 2^-100, the column sums to 1
    logits = torch.randn(4, 64, 100) * 60
    probabilities = logits.softmax(dim=1)
    assert int(((probabilities > 0) & (probabilities < 2.0 ** -100)).sum()) > 0
    assert torch.equal(flush_tiny(probabilities).sum(dim=1), probabilities.sum(dim=1))
