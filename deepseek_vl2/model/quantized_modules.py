"""Module swaps that give the language model quantized weights (compute/quantized.py).

What is quantized (`quantize_model`): the language model's `Linear`s (attention projections, dense
and shared MLPs, the output head) and the stacked routed experts. What is not: the vision tower,
the projector, embeddings, norms, routers, and MLA's `kv_b_proj` (small and base), whose weight
the absorbed decode reads whole, per head, and converts to fp32 every step. Measured on small's
4096x512: that conversion takes 0.25 ms a layer; dequantizing an int4 copy 1.47 ms (int8 0.59 ms),
for 3 MB (2 MB) fewer bytes read, about 0.15 ms: quantized it would cost 9-33 ms a token in all for
113 MB saved (1.3% of small in int4).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.execution import Execution, Linear
from ..compute.quantized import QuantizedWeight, QuantizeSpec
from .moe import Experts


class QuantizedModule(nn.Module):
    """A module whose weights (named in `quantized`) are QuantizedWeights. Their tensors are buffers
    `<name>_data` / `<name>_scale`, part of the module's state, allocated by `allocate` once the
    device and dtype are known (materialisation); `module.<name>` is the QuantizedWeight over them."""

    quantized: dict[str, tuple[int, ...]]  # weight name -> its shape, [*lead, out, in]

    def __init__(self, spec: QuantizeSpec):
        nn.Module.__init__(self)  # not super(): QuantizedExperts also derives from Experts
        self.spec = spec
        self._templates: dict[str, QuantizedWeight] = {}

    def allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        for name, (*lead, out_features, in_features) in self.quantized.items():
            weight = self.spec.empty(tuple(lead), out_features, in_features, dtype, device)
            self._templates[name] = weight
            self.register_buffer(f"{name}_data", weight.data)
            self.register_buffer(f"{name}_scale", weight.scale)

    def __getattr__(self, name: str):
        templates = self.__dict__.get("_templates", {})
        if name in templates:
            # Over the current buffers, so the weight follows them if the module is moved; rebuilt
            # only then (with its cached per-expert views).
            weight, buffers = templates[name], self.__dict__["_buffers"]
            data, scale = buffers[f"{name}_data"], buffers[f"{name}_scale"]
            if weight.data is not data or weight.scale is not scale:
                weight = templates[name] = dataclasses.replace(weight, data=data, scale=scale)
            return weight
        return super().__getattr__(name)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {name: getattr(self, name) for name in self._templates}


class QuantizedLinear(QuantizedModule):
    """A `Linear` with a quantized weight; the bias (if any) stays in the model dtype."""

    execution = Execution()

    def __init__(self, linear: nn.Linear, spec: QuantizeSpec):
        super().__init__(spec)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantized = {"weight": (linear.out_features, linear.in_features)}
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.execution.linear(x, self.weight, self.bias)


class QuantizedExperts(QuantizedModule, Experts):
    """Stacked routed experts with quantized weights. The grouped path (prefill) is `Experts`'s:
    one product per expert that has tokens, on that expert's QuantizedWeight. The sync-free paths
    (decode, CUDA graphs) run every product with the weight's kernel, without a host sync: `dense`
    each expert on every token; `gathered` each (token, expert) pair on its expert's quantized bytes,
    gathered by a device index."""

    def __init__(self, experts: Experts, spec: QuantizeSpec):
        QuantizedModule.__init__(self, spec)
        self.quantized = {"w_gate_up": tuple(experts.w_gate_up.shape), "w_down": tuple(experts.w_down.shape)}

    def forward_gathered(self, x, weights, indices) -> torch.Tensor:
        linear = self.execution.linear
        k = indices.shape[-1]
        flat = indices.flatten()
        w_gate_up, w_down = self.w_gate_up, self.w_down
        outputs = []
        for pair in range(flat.numel()):
            expert = flat[pair : pair + 1]  # a one-element index tensor gathers; an int would sync
            gate, up = linear(x[pair // k : pair // k + 1], w_gate_up[expert][0]).chunk(2, -1)
            outputs.append(linear(F.silu(gate) * up, w_down[expert][0]))
        return self._combine(torch.cat(outputs), weights, x.dtype)

    def forward_dense(self, x, weights, indices) -> torch.Tensor:
        linear = self.execution.linear
        w_gate_up, w_down = self.w_gate_up, self.w_down
        outputs = []
        for expert in range(w_gate_up.lead[0]):
            gate, up = linear(x, w_gate_up[expert]).chunk(2, -1)
            outputs.append(linear(F.silu(gate) * up, w_down[expert]))
        selected = torch.stack(outputs, dim=1)[torch.arange(x.shape[0], device=x.device)[:, None], indices]
        return self._combine(selected.flatten(0, 1), weights, x.dtype)


# Linears that stay in the model dtype: MLA's kv_b_proj, read whole by the absorbed decode (above).
KEPT_LINEARS = ("kv_b_proj",)


def quantize_model(model: nn.Module, spec: QuantizeSpec) -> None:
    """Swap the language model's Linears (except KEPT_LINEARS) and routed experts for quantized
    modules, before materialisation (the model is still on the meta device): nothing is allocated
    in the model dtype for them. `model.quantization` records the spec."""
    model.quantization = spec
    if spec.mode == "none":
        return
    for name, module in list(model.language.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, Linear) and child not in KEPT_LINEARS:
            replacement: nn.Module = QuantizedLinear(module, spec)
        elif isinstance(module, Experts) and not isinstance(module, QuantizedExperts):
            replacement = QuantizedExperts(module, spec)
        else:
            continue
        setattr(model.language.get_submodule(parent_name), child, replacement)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized weights would take in the model dtype, bytes they take)."""
    before = after = 0
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            for weight in module.quantized_weights().values():
                before += math.prod(weight.shape) * weight.scale.element_size()
                after += weight.nbytes
    return before, after
