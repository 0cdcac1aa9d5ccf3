"""One expert's math in torch, for every layout an architecture map declares.

`expert_forward(x, views, fmt, act_fn)` is what the runtime calls for an expert that is
not run by a compiled kernel. A plain expert (`ExpertLayout.plain`: down(act_fn(gate) * up),
no biases) goes to `kernels.expert_mlp` (on CUDA its Triton dequantize + cuBLAS prefill path,
else the torch reference). Any other expert is computed here: dequantize both matrices,
matmul, add the biases, apply the layout's named activation. The compiled kernels (Triton
decode, the C CPU kernel) are never handed such experts: the runtime decides from the map
(`runtime.kernels_compute`).

Our expert layout is always gate rows then up rows (the checkpoint reader de-interleaves
GPT-OSS's g0, u0, g1, u1, ... rows and its biases), so an activation takes (gate, up).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import ActFn, expert_mlp
from .format import BIASES, ExpertFormat


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gate (transformers' `GptOssExperts._apply_gate`): the gate clamped from above at
    `limit`, the up projection to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# layout activation name -> (fn(gate, up, **args), the experts module attributes that are its args)
ACTIVATIONS: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "clamped_swiglu": (clamped_swiglu, ("alpha", "limit")),
}


def expert_forward(
    x: torch.Tensor,
    views: dict[str, torch.Tensor],
    fmt: ExpertFormat,
    act_fn: ActFn | None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y of one expert for x [n, H] -> [n, H], whatever its layout (see the module docstring)."""
    math = fmt.compute
    if math.plain:
        return expert_mlp(x, views, fmt, act_fn, workspace)
    gate_up = fmt.dense(views, "gate_up_proj")  # [2I, H]
    y = x.to(gate_up.dtype) @ gate_up.T  # [n, 2I]
    if math.bias:
        y = y + views[BIASES["gate_up_proj"]].to(y.dtype)
    gate, up = y.chunk(2, dim=-1)
    if math.activation == "act_fn":
        h = act_fn(gate) * up
    else:
        fn, _ = ACTIVATIONS[math.activation]
        h = fn(gate, up, **dict(math.act_args))
    down = fmt.dense(views, "down_proj")  # [H, I]
    out = h @ down.T
    if math.bias:
        out = out + views[BIASES["down_proj"]].to(out.dtype)
    return out
