"""The mixture-of-experts feed-forward: router (Gate), stacked routed experts, shared experts,
and the dense MLP of the first layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.execution import Execution, Linear
from .config import LanguageConfig


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.gate_up = Linear(dim, 2 * width, bias=False)
        self.down_proj = Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: picks `top_k` experts per token and their weights, all in fp32."""

    fp32_params = ("weight", "e_score_correction_bias")

    def __init__(self, c: LanguageConfig):
        super().__init__()
        assert c.n_routed_experts is not None and c.num_experts_per_tok is not None
        self.top_k, self.method, self.scoring = c.num_experts_per_tok, c.topk_method, c.scoring_func
        self.n_group, self.topk_group = c.n_group or 1, c.topk_group or 1
        self.normalize, self.scaling = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(c.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, D] -> weights [N, k] (fp32), expert indices [N, k]."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weights, indices = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)
            weights, indices = self._topk_in_best_groups(scores, group_scores).topk(
                self.top_k, dim=-1, sorted=False
            )
        else:  # noaux_tc: the bias steers which experts are chosen, never how much they weigh
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.unflatten(-1, (self.n_group, -1)).topk(2, dim=-1).values.sum(-1)
            _, indices = self._topk_in_best_groups(choice, group_scores).topk(
                self.top_k, dim=-1, sorted=False
            )
            weights = scores.gather(-1, indices)
        if self.top_k > 1 and self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices

    def _topk_in_best_groups(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """Zero (not -inf, as the reference) every expert outside the `topk_group` best groups."""
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best, True)
        keep = keep.repeat_interleave(scores.shape[-1] // self.n_group, dim=-1)
        return scores.masked_fill(~keep, 0.0)


class Experts(nn.Module):
    """All routed experts' weights stacked; each token's output mixes only its selected experts."""

    execution = Execution()

    def __init__(self, n_experts: int, dim: int, width: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * width, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, width))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        execution = self.execution
        if x.shape[0] > execution.sync_free_expert_tokens:
            return self.forward_grouped(x, weights, indices)
        # Gathering copies each (token, expert) pair's weights and multiplies them: about 3x the
        # bytes of the pairs. Running every expert on every token reads each expert once.
        gathered = 3 * indices.numel() < self.w_gate_up.shape[0]
        if execution.sync_free_experts == "gathered" or (execution.sync_free_experts == "auto" and gathered):
            return self.forward_gathered(x, weights, indices)
        return self.forward_dense(x, weights, indices)

    def forward_grouped(self, x, weights, indices) -> torch.Tensor:
        """Sort (token, expert) pairs by expert and run one matmul per expert that has tokens.

        Reads each selected expert's weights once however many tokens chose it: the right shape
        for prefill. Costs one host sync to learn the group sizes.
        """
        linear = self.execution.linear
        k = indices.shape[-1]
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w_gate_up.shape[0]).tolist()
        token_of = order // k
        outputs = torch.empty(flat.numel(), x.shape[-1], device=x.device, dtype=x.dtype)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]
            gate, up = linear(x[token_of[start : start + count]], self.w_gate_up[expert]).chunk(2, -1)
            outputs[rows] = linear(F.silu(gate) * up, self.w_down[expert])
            start += count
        return self._combine(outputs, weights, x.dtype)

    def forward_gathered(self, x, weights, indices) -> torch.Tensor:
        """Gather each token's selected expert weights and batch-multiply: no host sync, so it
        can be captured in a CUDA graph; for a few tokens, which rarely share an expert."""
        k = indices.shape[-1]
        flat = indices.flatten()
        tokens = x.repeat_interleave(k, dim=0)[:, None, :]
        gate, up = torch.bmm(tokens, self.w_gate_up[flat].transpose(1, 2)).chunk(2, -1)
        outputs = torch.bmm(F.silu(gate) * up, self.w_down[flat].transpose(1, 2))
        return self._combine(outputs[:, 0], weights, x.dtype)

    def forward_dense(self, x, weights, indices) -> torch.Tensor:
        """Every expert on every token, keeping only the selected results: no host sync, and each
        expert's weights read once; for a batch of decode rows that together touch most experts."""
        n_experts = self.w_gate_up.shape[0]
        tokens = x[None].expand(n_experts, -1, -1)
        gate, up = torch.bmm(tokens, self.w_gate_up.transpose(1, 2)).chunk(2, -1)
        outputs = torch.bmm(F.silu(gate) * up, self.w_down.transpose(1, 2))  # [E, n, D]
        selected = outputs.permute(1, 0, 2)[torch.arange(x.shape[0], device=x.device)[:, None], indices]
        return self._combine(selected.flatten(0, 1), weights, x.dtype)

    @staticmethod
    def _combine(outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weighted sum over each token's k experts, in fp32 like the reference."""
        n, k = weights.shape
        return (outputs.float().view(n, k, -1) * weights[..., None]).sum(dim=1).to(dtype)


class MoE(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        assert c.n_routed_experts is not None
        self.gate = Gate(c)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        width = c.shared_expert_width
        self.shared_experts = MLP(c.hidden_size, width) if width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(flat)
        out = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)
