"""Tests for byol.py: loss, tau schedule, target update, LARS, BYOL forward.
Run: python -m pytest tests/test_byol.py"""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import resnet  # noqa: E402
from byol import BYOL, LARS, byol_loss, lars_param_groups, mlp, tau_at  # noqa: E402


# ---------------------------------------------------------------- loss, tau

def test_loss_matches_formula():
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    cos = (p * z).sum(1) / (p.pow(2).sum(1).sqrt() * z.pow(2).sum(1).sqrt())
    assert torch.allclose(byol_loss(p, z), (2 - 2 * cos).mean(), atol=1e-6)
    assert byol_loss(p, 3 * p).abs() < 1e-6 and torch.isclose(byol_loss(p, -p), torch.tensor(4.0))


def test_tau_schedule():
    assert tau_at(0, 100) == pytest.approx(0.99)
    assert tau_at(50, 100) == pytest.approx(0.995)
    assert tau_at(100, 100) == pytest.approx(1.0)


# ---------------------------------------------------------------- BYOL

def small_byol():
    return BYOL(resnet.resnet18(in_chans=1), proj_hidden=32, proj_dim=16, pred_hidden=32)


def test_state_dict_keys():
    keys = small_byol().state_dict().keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"backbone", "projector", "predictor", "target_backbone", "target_projector"}
    assert {k for k in keys if k.startswith("projector.")} == {
        f"projector.{i}.{n}" for i, n in [(0, "weight"), (0, "bias"), (1, "weight"), (1, "bias"), (1, "running_mean"),
                                          (1, "running_var"), (1, "num_batches_tracked"), (3, "weight"), (3, "bias")]}
    assert [m.__class__ for m in mlp(4, 8, 2)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_update_target():
    model = small_byol()
    with torch.no_grad():
        for p in model._online_params():
            p.add_(torch.randn_like(p))
    online = [p.clone() for p in model._online_params()]
    target = [p.clone() for p in model._target_params()]
    model.update_target(0.9)
    for o, t, p, q in zip(online, target, model._online_params(), model._target_params()):
        assert torch.equal(p, o)                                   # online untouched
        assert torch.allclose(q, 0.9 * t + 0.1 * o, atol=1e-6)


@pytest.mark.parametrize("concat_views", [False, True])
def test_forward_backward(concat_views):
    torch.manual_seed(0)
    model = BYOL(resnet.resnet18(in_chans=1), concat_views=concat_views)   # paper head sizes
    v1, v2 = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    loss, z1 = model(v1, v2)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 <= loss.item() <= 8
    assert z1.shape == (4, 256) and not z1.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in model._online_params())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model._target_params())


# ---------------------------------------------------------------- LARS

def test_lars_param_groups():
    model = small_byol()
    weights, others = lars_param_groups(model, 1e-5)
    assert weights["weight_decay"] == 1e-5 and others["weight_decay"] == 0.0 and others["lars_exclude"]
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim <= 1 for p in others["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(weights["params"]) + len(others["params"]) == len(trainable)


def two_steps(net, opt, grads):
    for g in grads:
        for p, gp in zip(net.parameters(), g):
            p.grad = gp.clone()
        opt.step()


def test_lars_excluded_is_sgd_with_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ref = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ref.load_state_dict(net.state_dict())
    grads = [[torch.randn_like(p) for p in net.parameters()] for _ in range(2)]
    two_steps(net, LARS(lars_param_groups(net, 1e-2), lr=0.1), grads)
    two_steps(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), grads)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        if p.ndim <= 1:                                            # biases, BN weights: plain SGD, no wd
            assert torch.allclose(p, q, atol=1e-6), name
        else:
            assert not torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("lr", [1.0, 1e-4])   # trust ratio below lr (adapted) and above it (clipped to 1)
def test_lars_adapted_step_by_hand(lr):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    g = torch.randn(3, 4)
    w0 = w.detach().clone()
    w.grad = g.clone()
    eta, wd, eps = 0.02, 1e-5, 1e-8
    LARS([w], lr=lr, eta=eta, weight_decay=wd).step()
    q = eta * w0.norm() / (g.norm() + wd * w0.norm() + eps)
    q = min(q.item() / lr, 1.0)
    assert (q < 1) == (lr == 1.0)
    assert torch.allclose(w.detach(), w0 - lr * q * (g + wd * w0), atol=1e-7)
