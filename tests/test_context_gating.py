"""Context gating (Miech, Laptev & Sivic 2017): y = sigmoid(W x + b) * x, or with a batch norm on W x (LOUPE), as a
descriptor layer, inside an Embedder and as a task option; references written here from the definition."""
import numpy as np
import pytest
import torch

from aggnets import Embedder
from aggnets.backbones import build_backbone
from aggnets.heads import ContextGating, GeM


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_gating_equals_its_definition():
    gate = ContextGating(6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    W, b = gate.fc.weight.detach().numpy(), gate.fc.bias.detach().numpy()
    expected = np.stack([_sigmoid(W @ v + b) * v for v in x.numpy()])
    np.testing.assert_allclose(gate(x).detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    assert set(gate.state_dict()) == {"fc.weight", "fc.bias"}


def test_gating_with_batch_norm_uses_its_statistics_in_eval():
    gate = ContextGating(5, batch_norm=True).double()
    assert gate.fc.bias is None
    with torch.no_grad():
        gate.bn.running_mean.uniform_(-1, 1)
        gate.bn.running_var.uniform_(0.5, 2)
        gate.bn.weight.uniform_(0.5, 1.5)
        gate.bn.bias.uniform_(-0.5, 0.5)
    gate.eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    bn = gate.bn
    z = x.numpy() @ gate.fc.weight.detach().numpy().T
    z = (z - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps) * bn.weight.detach().numpy() \
        + bn.bias.detach().numpy()
    np.testing.assert_allclose(gate(x).detach().numpy(), _sigmoid(z) * x.numpy(), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(gate, (x.requires_grad_(),))


def test_bad_input_and_arguments():
    with pytest.raises(ValueError, match="dim"):
        ContextGating(0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 6\)"):
        ContextGating(6)(torch.randn(2, 5))


def test_embedder_gates_after_the_projection():
    backbone = build_backbone("resnet18", "layer1", weights=None).eval()
    model = Embedder(backbone, GeM(64), projection_dim=16, context_gating=True, normalize=False).eval()
    assert model.context_gating.dim == 16 and model.out_dim == 16
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        projected = model.projection(model.head(backbone(images)))
        torch.testing.assert_close(model(images), torch.sigmoid(model.context_gating.fc(projected)) * projected)
    assert {"context_gating.fc.weight", "context_gating.fc.bias"} <= set(model.state_dict())
