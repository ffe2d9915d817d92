"""Low-rank adapters: LoRA (Hu et al., arXiv:2106.09685) and MoLoRA, a gated mixture of LoRA
experts of different ranks (specs/adamesh.md §4).

Both are *weight deltas*: a module that returns ΔW with the shape of the weight it adapts,
so the adapted layer computes with ``W0 + ΔW`` and the pre-trained ``W0`` is never touched.

* :class:`LoRA` - ΔW = s · B A for any weight of shape (m, *rest), viewed as the matrix
  m x prod(rest) (for a Conv1d weight (m, n/g, k): m x ((n/g)·k), spec D5).
  A (r, prod(rest)) is Kaiming-uniform, B (m, r) is zero, so ΔW = 0 until B trains;
  s = alpha / r (alpha None: s = 1).
* :class:`MoLoRA` - ΔW = Σ_i softmax(γ)_i · s_i B_i A_i over experts of ranks r_i, with
  input-independent gate logits γ (initialised to 0: equal weights), spec §4.2.
* :class:`AdaptedConv1d` / :class:`AdaptedLinear` - a frozen-or-not base layer plus a delta.
* :func:`apply_adapters` - wrap the selected ``nn.Conv1d`` / ``nn.Linear`` submodules of a
  model in place; :func:`adapter_parameters` - the adapters' parameters by name.
* :func:`adapter_values` - functional application: inside ``with adapter_values(model, values)``
  the adapters compute their deltas from ``values`` (tensors keyed like
  :func:`adapter_parameters`; they may require grad) instead of their own parameters. The
  override lives in thread-local state, so the model is never modified and concurrent
  threads can each apply a different set (e.g. per-speaker adapters in a server).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaptedConv1d",
    "AdaptedLinear",
    "LoRA",
    "MoLoRA",
    "adapter_parameters",
    "adapter_values",
    "apply_adapters",
    "molora_parameter_count",
]


class LoRA(nn.Module):
    """One low-rank delta ΔW = s · B A for a weight of shape ``weight_shape`` = (m, *rest)."""

    def __init__(self, weight_shape: Sequence[int], rank: int, alpha: float | None = None) -> None:
        super().__init__()
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) < 2:
            raise ValueError(f"LoRA adapts a matrix-like weight (m, ...), got shape {shape}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.weight_shape = shape
        self.rank = int(rank)
        m, n = shape[0], math.prod(shape[1:])
        self.A = nn.Parameter(torch.empty(rank, n))  # (r, n)
        self.B = nn.Parameter(torch.zeros(m, rank))  # (m, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear / LoRA
        self.scale = 1.0 if alpha is None else float(alpha) / rank

    def delta(self, values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ΔW with the adapted weight's shape (``values`` {"A", "B"} replace the parameters)."""
        a = self.A if values is None else values.get("A", self.A)
        b = self.B if values is None else values.get("B", self.B)
        return (self.scale * (b @ a)).view(self.weight_shape)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, rank={self.rank}, scale={self.scale:g}"


class MoLoRA(nn.Module):
    """Mixture of LoRA experts of ranks ``ranks`` with a learned, input-independent softmax gate.

    ``alpha`` None gives every expert scale 1 (spec default α_i = r_i); a float gives
    s_i = alpha / r_i. ``experts[i]`` is a :class:`LoRA`; ``gate`` holds the logits (N,).
    """

    def __init__(self, weight_shape: Sequence[int], ranks: Sequence[int], alpha: float | None = None) -> None:
        super().__init__()
        ranks = tuple(int(r) for r in ranks)
        if not ranks:
            raise ValueError("MoLoRA needs at least one expert rank")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.ranks = ranks
        self.experts = nn.ModuleList(LoRA(self.weight_shape, r, alpha) for r in ranks)
        self.gate = nn.Parameter(torch.zeros(len(ranks)))  # (N,) logits

    def gate_weights(self, values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """softmax(γ) (N,): the experts' mixing weights (sum to 1)."""
        gate = self.gate if values is None else values.get("gate", self.gate)
        return torch.softmax(gate, dim=0)

    def expert_delta(self, i: int, values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Expert i's unweighted ΔW_i = s_i B_i A_i (weight shape)."""
        sub = (
            None
            if values is None
            else {k.split(".", 2)[2]: v for k, v in values.items() if k.startswith(f"experts.{i}.")}
        )
        return self.experts[i].delta(sub)

    def delta(self, values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ΔW = Σ_i softmax(γ)_i ΔW_i (weight shape). ``values`` (keys ``gate``,
        ``experts.<i>.A``, ``experts.<i>.B``) replace the corresponding parameters."""
        w = self.gate_weights(values)
        out = w[0] * self.expert_delta(0, values)
        for i in range(1, len(self.experts)):
            out = out + w[i] * self.expert_delta(i, values)
        return out

    def entropy(self, values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Entropy of the gate weights (log N when uniform)."""
        w = self.gate_weights(values)
        return -(w * torch.log(w.clamp_min(1e-12))).sum()

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, ranks={self.ranks}"


Delta = LoRA | MoLoRA

_LOCAL = threading.local()  # per-thread {id(adapter): {parameter name: tensor}} (adapter_values)


def _override(adapter: nn.Module) -> Mapping[str, torch.Tensor] | None:
    table = getattr(_LOCAL, "values", None)
    return None if table is None else table.get(id(adapter))


class AdaptedConv1d(nn.Module):
    """``base`` (an ``nn.Conv1d``, zero padding) computed with weight ``base.weight + adapter.delta()``."""

    def __init__(self, base: nn.Conv1d, adapter: Delta) -> None:
        super().__init__()
        if base.padding_mode != "zeros":
            raise ValueError(f"AdaptedConv1d supports zero padding only, got {base.padding_mode!r}")
        if tuple(adapter.weight_shape) != tuple(base.weight.shape):
            raise ValueError(f"adapter shape {adapter.weight_shape} != conv weight {tuple(base.weight.shape)}")
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        w = b.weight + self.adapter.delta(_override(self.adapter))
        return F.conv1d(x, w, b.bias, b.stride, b.padding, b.dilation, b.groups)


class AdaptedLinear(nn.Module):
    """``base`` (an ``nn.Linear``) computed with weight ``base.weight + adapter.delta()``."""

    def __init__(self, base: nn.Linear, adapter: Delta) -> None:
        super().__init__()
        if tuple(adapter.weight_shape) != tuple(base.weight.shape):
            raise ValueError(f"adapter shape {adapter.weight_shape} != linear weight {tuple(base.weight.shape)}")
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.adapter.delta(_override(self.adapter)), self.base.bias)


def apply_adapters(
    model: nn.Module,
    select: Callable[[str, nn.Module], bool],
    make: Callable[[tuple[int, ...]], Delta],
) -> list[str]:
    """Wrap, in place, every ``nn.Conv1d`` / ``nn.Linear`` submodule of ``model`` for which
    ``select(qualified_name, module)`` is true, with an adapter ``make(weight_shape)``.
    Returns the qualified names of the wrapped layers, in module order."""
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Conv1d, nn.Linear)) and name and select(name, mod)
    ]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = make(tuple(mod.weight.shape))
        wrapped = AdaptedConv1d(mod, adapter) if isinstance(mod, nn.Conv1d) else AdaptedLinear(mod, adapter)
        setattr(parent, child, wrapped)
    return [name for name, _ in targets]


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to a LoRA/MoLoRA adapter, by qualified name."""
    out: dict[str, nn.Parameter] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (AdaptedConv1d, AdaptedLinear)):
            prefix = f"{name}.adapter." if name else "adapter."
            for pname, p in mod.adapter.named_parameters():
                out[prefix + pname] = p
    return out


@contextlib.contextmanager
def adapter_values(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, on this thread, the adapters of ``model`` use ``values`` (keys as in
    :func:`adapter_parameters`) instead of their own parameters; unknown keys are errors.
    Nested blocks stack; nothing in ``model`` is modified."""
    known = adapter_parameters(model)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"adapter_values: no adapter parameter(s) {unknown[:3]} in this model")
    table: dict[int, dict[str, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (AdaptedConv1d, AdaptedLinear)):
            prefix = f"{name}.adapter." if name else "adapter."
            sub = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            if sub:
                table[id(mod.adapter)] = sub
    previous = getattr(_LOCAL, "values", None)
    _LOCAL.values = {**(previous or {}), **table}
    try:
        yield
    finally:
        _LOCAL.values = previous


def molora_parameter_count(weight_shapes: Sequence[Sequence[int]], ranks: Sequence[int]) -> int:
    """Trainable values of MoLoRA adapters on weights of these shapes:
    Σ_layers [Σ_i r_i (m + prod(rest))] + N gate logits per layer (spec §4.2)."""
    total = 0
    for shape in weight_shapes:
        m, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
        total += sum(int(r) for r in ranks) * (m + n) + len(ranks)
    return total
