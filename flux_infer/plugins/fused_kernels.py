"""``fused_kernels``: every RMSNorm and every gated MLP activation runs on flux kernels.

The replacement modules share the original ``Parameter`` objects and child ``Linear`` modules, so the
``state_dict`` (names, tensors, storage) is unchanged.
"""

from __future__ import annotations

import torch

from flux_infer import kernels
from flux_infer.adapters.base import MLP_PROJECTIONS, MLPStyle, NormStyle
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.support import Support


class FluxRMSNorm(torch.nn.Module):
    """RMSNorm on ``torch.ops.flux.rms_norm``, holding the original module's weight."""

    def __init__(self, weight: torch.nn.Parameter, eps: float, weight_offset: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = float(eps)
        self.weight_offset = float(weight_offset)

    @property
    def variance_epsilon(self) -> float:  # the attribute name Llama-style modules use
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.weight_offset)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, weight_offset={self.weight_offset}"


class FluxLinear(torch.nn.Linear):
    """A ``Linear`` on ``torch.ops.flux.linear`` (a bandwidth-bound GEMV at decode batch sizes), sharing the
    original module's parameters."""

    def __init__(self, original: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = original.in_features, original.out_features
        self.weight = original.weight
        if original.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = original.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class FluxGatedMLP(torch.nn.Module):
    """``down(act(gate(x)) * up(x))`` with the activation and the product in one flux kernel: the epilogue of a fused
    quantized gate/up layer's matmul, else ``act_mul``."""

    gated_epilogue = True  # False: quantized gate/up and act_mul as two kernels (benchmarks/decode.py's *_unfused)

    def __init__(self, projections: dict[str, torch.nn.Module], activation: str, fused_gate_up: bool) -> None:
        super().__init__()
        for name, module in projections.items():
            self.add_module(name, module)
        self.activation = activation
        self.fused_gate_up = fused_gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self, "flux_fused_gate_up", None)  # set by the fuse_projections plugin
        if (fused is not None and fused.quantized is not None and fused.sizes[0] == fused.sizes[1]
                and self.gated_epilogue):
            return self.down_proj(fused.quantized.gated(x, self.activation))  # the product in the matmul
        if fused is not None:
            gate, up = fused(x).split(fused.sizes, dim=-1)
        elif self.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(kernels.act_mul(gate, up, self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"



def _norm_eps(norm: torch.nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(norm, attr, None)
        if isinstance(value, float):
            return value
    return None


class FusedKernelsPlugin(Plugin):
    name = "fused_kernels"
    description = "RMSNorm and gated activations (SwiGLU, GeGLU) on fused flux kernels"
    provides = frozenset({"kernels:rms_norm", "kernels:gated_activation"})
    after = ("weights:quantized",)
    config_field = "fused_kernels"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        adapter = ctx.adapter
        assert adapter is not None  # needs_adapter: the planner skips models without one
        for qualname, _, _, norm in adapter.norms(model):
            weight = getattr(norm, "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or _norm_eps(norm) is None:
                return Support.no(f"{qualname} ({type(norm).__name__}) is not an RMSNorm with a weight and eps")
        return Support.yes()

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        adapter = ctx.adapter
        assert adapter is not None
        offset = 1.0 if adapter.norm_style is NormStyle.ONE_PLUS_WEIGHT else 0.0
        norms = 0
        for _, parent, attr, norm in list(adapter.norms(model)):
            ctx.patch.replace_module(parent, attr, FluxRMSNorm(norm.weight, _norm_eps(norm), offset))
            norms += 1
        ctx.use_kernel("rms_norm", kernels.implementation("rms_norm", ctx.device))
        ctx.detail("norms", norms)

        activation = adapter.activation(model)
        style = adapter.dense_mlp_style()
        mlps = 0
        if activation is not None and style in MLP_PROJECTIONS:
            for _, parent, attr, mlp in list(adapter.dense_mlps(model)):
                names = MLP_PROJECTIONS[style]
                if not all(isinstance(getattr(mlp, n, None), torch.nn.Module) for n in names):
                    continue  # an MLP of another shape: leave it as it is
                projections = {n: getattr(mlp, n) for n in names}
                fused = FluxGatedMLP(projections, activation, style is MLPStyle.GATED_FUSED)
                ctx.patch.replace_module(parent, attr, fused)
                mlps += 1
        if mlps:
            ctx.use_kernel("act_mul", kernels.implementation("act_mul", ctx.device))
        ctx.detail("gated_mlps", mlps)

        # Linear layers gain only where a device GEMV exists (on the CPU, F.linear is the reference itself).
        if kernels.implementation("linear", ctx.device) != "reference":
            linears = [(p, a, m) for _, p, a, m in adapter.linears(model) if type(m) is torch.nn.Linear]
            parent_path, _, head_attr = adapter.lm_head.rpartition(".")
            head_parent = model.get_submodule(parent_path)
            if type(getattr(head_parent, head_attr, None)) is torch.nn.Linear:
                linears.append((head_parent, head_attr, getattr(head_parent, head_attr)))
            for parent, attr, module in linears:
                ctx.patch.replace_module(parent, attr, FluxLinear(module))
            ctx.use_kernel("linear", kernels.implementation("linear", ctx.device))
            ctx.detail("linears", len(linears))
