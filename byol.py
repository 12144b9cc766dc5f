"""BYOL as the paper configured it (solo-learn's): the method and its LARS optimiser.

Online and target networks, the loss, the cosine tau schedule and LARS (the views are augment.py's):

    model = BYOL(resnet50(in_chans=1))                  # paper sizes: 2048 -> 4096 -> 256 -> 8192 -> 256
    optimizer = LARS(lars_param_groups(model, 1e-5), lr=lr)
    v1 = augment(x, sizes, gen, MEAN, STD)                       # (B, 1, H, W) raw -> (B, 1, 224, 224)
    v2 = augment(x, sizes, gen, MEAN, STD)
    loss, z1 = model(v1, v2); loss.backward(); optimizer.step()
    model.update_target(tau_at(step, total_steps))               # after the optimizer step

Load initial weights into the backbone before building BYOL: the target starts as a copy of it.
Tests: python -m pytest tests/test_byol.py
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# loss and schedule: pure functions

def byol_loss(p, z):
    """(B, D) online predictions, (B, D) target projections -> mean over the batch of 2 - 2 cos(p, z)"""
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1).mean()


def tau_at(step, total_steps, base=0.99, final=1.0):
    """target momentum, cosine from base to final over training (paper: 0.99 -> 1.0)"""
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# -----------------------------------------------------------------------------
# the networks

def mlp(in_dim, hidden_dim, out_dim):
    """projector / predictor head of solo-learn's BYOL; state-dict keys 0.*, 1.*, 3.*"""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class BYOL(nn.Module):
    def __init__(self, backbone, proj_hidden=4096, proj_dim=256, pred_hidden=8192, concat_views=False):
        # paper (solo-learn byol_acdc.yaml): proj_hidden_dim 4096, proj_output_dim 256, pred_hidden_dim 8192
        super().__init__()
        # concat_views=False forwards the two views one after the other, as solo-learn did, so every
        # BatchNorm normalises each view with its own batch statistics. Concatenating them into one
        # batch of 2B is a little faster on a GPU (about 7%, as reported for this project) but mixes the
        # two views' statistics, which is not what the paper trained; off by default.
        self.concat_views = concat_views
        self.backbone = backbone                                        # online
        self.projector = mlp(backbone.num_features, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim)
        self.target_backbone = copy.deepcopy(self.backbone)             # target = copy of the online net,
        self.target_projector = copy.deepcopy(self.projector)           # moved only by update_target
        for p in self._target_params():
            p.requires_grad = False

    def _online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def _target_params(self):
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def _online(self, x):
        return self.projector(self.backbone(x))                # (B, 1, H, W) -> (B, 2048) -> (B, 256)

    def _target(self, x):
        return self.target_projector(self.target_backbone(x))  # (B, 1, H, W) -> (B, 2048) -> (B, 256)

    def _both_views(self, net, a, b):
        if self.concat_views:                                  # one batch of 2B: shared BN statistics
            return net(torch.cat([a, b])).chunk(2)
        return net(a), net(b)                                  # BN statistics per view (solo-learn)

    def forward(self, view1, view2):
        """two (B, 1, H, W) views of the same images
        -> (scalar loss, (B, 256) online projection of view1, detached)"""
        z1, z2 = self._both_views(self._online, view1, view2)         # (B, 256) each
        p1, p2 = self._both_views(self.predictor, z1, z2)             # (B, 256) each
        with torch.no_grad():
            z1_target, z2_target = self._both_views(self._target, view1, view2)   # (B, 256) each
        # symmetric: each view's prediction regresses the target's projection of the other view
        loss = byol_loss(p1, z2_target) + byol_loss(p2, z1_target)
        return loss, z1.detach()                                      # z1: for watching collapse (its std)

    @torch.no_grad()
    def update_target(self, tau):
        """target = tau * target + (1 - tau) * online, over parameters.
        The target's BatchNorm buffers are not averaged: as in solo-learn the target runs in train mode,
        so its own forward passes keep its running statistics."""
        online, target = self._online_params(), self._target_params()
        torch._foreach_mul_(target, tau)
        torch._foreach_add_(target, online, alpha=1 - tau)


# -----------------------------------------------------------------------------
# LARS (solo-learn's, from Lightning Bolts), with the paper's settings as defaults

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling. For each adapted tensor w with gradient g:

        q = eta * ||w|| / (||g|| + wd * ||w|| + eps)        # trust ratio
        q = min(q / lr, 1)                                   # clip_lr (LARC): never step faster than lr
        d = q * (g + wd * w)
        v = momentum * v + d ;  w = w - lr * v

    A tensor is excluded (d = g: no adaptation, no weight decay) when its group has lars_exclude=True or,
    with exclude_bias_n_norm, when it is 1-D (biases, norm weights); also, as in solo-learn, for a step
    where ||w|| or ||g|| is zero. Paper: momentum 0.9, eta 0.02, clip_lr, exclude_bias_n_norm, wd 1e-5.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-5, eta=0.02, clip_lr=True,
                 exclude_bias_n_norm=True, eps=1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr,
                        exclude_bias_n_norm=exclude_bias_n_norm, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)
        self._adapt = {}  # per group of tensors: which ones LARS adapts

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            # one trust ratio per tensor, computed on the device for all tensors at once (no host syncs)
            key = tuple(map(id, params))
            # built once: a tensor made from a list each step would wait for the GPU
            if key not in self._adapt:
                excluded = [group["lars_exclude"] or (group["exclude_bias_n_norm"] and p.ndim <= 1)
                            for p in params]
                self._adapt[key] = ~torch.tensor(excluded, device=params[0].device)
            w_norm = torch.stack(torch._foreach_norm(params))              # (N,)
            g_norm = torch.stack(torch._foreach_norm(grads))               # (N,)
            adapt = self._adapt[key] & (w_norm > 0) & (g_norm > 0)
            q = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            if group["clip_lr"]:
                q = torch.clamp(q / lr, max=1.0)
            q = torch.where(adapt, q, 1.0)                                 # excluded: q = 1 ...
            decay = torch.where(adapt, wd, 0.0)                            # ... and no weight decay
            d = torch._foreach_add(grads, torch._foreach_mul(params, list(decay.unbind())))
            torch._foreach_mul_(d, list(q.unbind()))                       # d = q * (g + wd * w)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:                         # zeros: first v = d, as solo-learn
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)                                   # v = momentum * v + d
            torch._foreach_add_(params, bufs, alpha=-lr)                   # w = w - lr * v
        return loss


def lars_param_groups(model, weight_decay):
    """weights (adapted, decayed) and 1-D tensors (biases, norm weights: lars_exclude); the frozen
    target is left out"""
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": weights, "weight_decay": weight_decay},
            {"params": others, "weight_decay": 0.0, "lars_exclude": True}]
