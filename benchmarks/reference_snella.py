"""Transcription of the SNELLA authors' code, kept as a test oracle (tests/test_reference_snella.py).

Source: github.com/ssfgunner/SNELL (2025), the SNELLA follow-up to SNELL ("Kernelized Sparse Fine-Tuning with
Bi-level Parameter Competition for Vision Models", arXiv 2510.24037):

- ``model/vision_transformer_timm.py``, class ``SNELLA`` (``pathIntegrals``, ``sparsify``, ``_forward``), the
  module ``TuningModule`` builds for ``tuning_model='snella'``; ``MixK`` is the same kernel without ``sparsify``;
- ``sparse_allocator.py``, class ``Allocator`` (``schedule_threshold``, ``update_ipt`` with ``metric='ipt'``,
  ``calculate_score``, ``param_alloc``, ``mask_to_target_ratio``, ``update``).

Changes, none of which alters a value where theirs gives one: the gradient checkpoint around ``_forward`` is
left out (it recomputes the same thing in backward); the unused ``mag`` / ``w_mag`` metrics, prints and bias
options are left out; the model's SNELLA modules are passed in as a name → module dict instead of found by
``hasattr`` on ``named_modules``; the allocator's float32 ``torch.Tensor(...)`` becomes float64, so that the oracle
and snell round alike; all-zero scores give equal shares (theirs raises there); and the left-over loop of
``param_alloc`` stops after ``MAX_ROUNDS`` rounds, where in float64 a remainder below the last bit can no longer
move the sum (theirs, in float32, ends the same way after a few rounds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROUNDS = 100


class ReferenceSNELLA(nn.Module):
    """``SNELLA``: ΔW (in, out) = Σ_p c_p·cdist(In_p, Out_p), + α·softmax(·/γ, dim=-1) + β, then sparsified."""

    def __init__(self, in_features: int, out_features: int, q_dim: int, init_thres: float, num_hs: int = 2) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.In_Qs = nn.Parameter(torch.rand(num_hs, in_features, q_dim // num_hs))
        self.Out_Qs = nn.Parameter(torch.rand(num_hs, out_features, q_dim // num_hs))
        coefficients = 0.1 * torch.tensor([(-1) ** h for h in range(num_hs)]).unsqueeze(1).unsqueeze(2)
        self.shared_coeff_fc = nn.Parameter(coefficients, requires_grad=False)
        self.alpha = nn.Parameter(torch.ones(1))
        self.gamma = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))
        nn.init.kaiming_uniform_(self.In_Qs, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.Out_Qs, a=math.sqrt(5))
        self.init_thres = init_thres

    def path_integrals(self) -> Tensor:
        """``pathIntegrals``: the dense mixed-kernel ΔW, shape (in, out); the softmax runs over out."""
        dist_io = torch.cdist(self.In_Qs, self.Out_Qs, p=2)
        dist_io = torch.sum(self.shared_coeff_fc * dist_io, dim=0)
        return dist_io + self.alpha * F.softmax(dist_io / self.gamma, dim=-1) + self.beta

    def sparsify(self, weight: Tensor) -> Tensor:
        """Keep |ΔW| > the init_thres-quantile (linear interpolation), as ΔW·|ΔW| with |ΔW| detached."""
        weight_abs = weight.detach().abs()
        thres = torch.quantile(weight_abs.flatten(), self.init_thres)
        return weight * F.threshold(weight_abs, float(thres), 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.sparsify(self.path_integrals()).T)


class ReferenceMixK(ReferenceSNELLA):
    """``MixK`` (``tuning_model='mixk'``, the caltech, svhn and cars scripts): the same kernel, never sparsified."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.path_integrals().T)


class ReferenceAllocator:
    """``Allocator`` with ``metric='ipt'``: the schedule is stepped once per epoch, the sensitivity once per step."""

    def __init__(
        self,
        modules: dict[str, ReferenceSNELLA],
        target_ratio: float,
        init_warmup: int,
        final_warmup: int,
        mask_interval: int,
        beta1: float,
        beta2: float,
        total_step: int,
    ) -> None:
        self.modules = modules
        self.initial_warmup, self.final_warmup = init_warmup, final_warmup
        self.mask_interval, self.beta1, self.beta2, self.total_step = mask_interval, beta1, beta2, total_step
        self.ipt: dict[str, Tensor] = {}
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}
        self.alloc_volume_dict: dict[str, float] | None = None
        self.name_list = list(modules)
        self.max_alloc_list = [m.in_features * m.out_features for m in modules.values()]
        self.init_nonzero_param = sum((1 - m.init_thres) * m.in_features * m.out_features for m in modules.values())
        self.target_nonzero_param = sum((1 - target_ratio) * m.in_features * m.out_features for m in modules.values())

    def schedule_threshold(self, step: int) -> tuple[float, bool]:
        if step <= self.initial_warmup:
            return self.init_nonzero_param, False
        if step > self.total_step - self.final_warmup:
            return self.target_nonzero_param, True
        span = self.total_step - self.final_warmup - self.initial_warmup
        mul_coeff = 1 - (step - self.initial_warmup) / span
        curr_volume = self.target_nonzero_param + (self.init_nonzero_param - self.target_nonzero_param) * (mul_coeff**3)
        return int(curr_volume), step % self.mask_interval == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        for name, module in self.modules.items():
            for factor in ("In_Qs", "Out_Qs"):
                key, param = f"{name}.{factor}", getattr(module, factor)
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param)
                    self.exp_avg_unc[key] = torch.zeros_like(param)
                ipt = (param * param.grad).abs().detach()
                self.ipt[key] = torch.where(torch.isnan(ipt), torch.full_like(ipt, 0), ipt)
                self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * self.ipt[key]
                self.exp_avg_unc[key] = (
                    self.beta2 * self.exp_avg_unc[key]
                    + (1 - self.beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
                )

    def calculate_score(self, key: str) -> Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def param_alloc(self, scores: Tensor, curr_volume: float, max_alloc_volumes: Tensor) -> Tensor:
        alloc_volumes = (curr_volume * scores).squeeze().int()
        alloc_volumes = torch.min(max_alloc_volumes, alloc_volumes)
        alloc_delta = curr_volume - torch.sum(alloc_volumes)
        rounds = 0
        while alloc_delta > 0 and rounds < MAX_ROUNDS:
            volume_remain = max_alloc_volumes - alloc_volumes
            idx = torch.nonzero(volume_remain).squeeze()
            share = (alloc_delta * scores[idx] / torch.sum(scores[idx])).squeeze()
            alloc_volumes[idx] += torch.min(share, volume_remain[idx])
            alloc_delta = curr_volume - torch.sum(alloc_volumes)
            rounds += 1
        return alloc_volumes.int()

    def mask_to_target_ratio(self, curr_volume: float) -> dict[str, float]:
        scores = []
        for name in self.modules:
            in_score = self.calculate_score(f"{name}.In_Qs").mean()
            out_score = self.calculate_score(f"{name}.Out_Qs").mean()
            scores.append(in_score + out_score)
        scores = torch.tensor(scores, dtype=torch.float64)
        if torch.sum(scores) == 0:
            # Theirs sets scores = 1 / L, a float, and param_alloc then fails on float.squeeze(): equal shares
            # are what it means (never reached after a step with gradients).
            scores = torch.full((len(self.modules),), 1 / len(self.modules), dtype=torch.float64)
        else:
            scores = scores / torch.sum(scores)
        max_alloc_volumes = torch.tensor(self.max_alloc_list, dtype=torch.float64).squeeze()
        alloc_volumes = self.param_alloc(scores, curr_volume, max_alloc_volumes)
        ratios = {}
        for (name, module), volume in zip(self.modules.items(), alloc_volumes.tolist(), strict=True):
            updated_thres = 1 - float(volume / (module.in_features * module.out_features))
            module.init_thres = min(max(updated_thres, 0), 1)
            ratios[name] = module.init_thres
        return ratios

    def update(self, global_step: int) -> None:
        curr_volume, mask_ind = self.schedule_threshold(global_step)
        if mask_ind:
            self.alloc_volume_dict = self.mask_to_target_ratio(curr_volume)
