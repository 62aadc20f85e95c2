"""Module hooks users registered before `transform`: one defined behaviour.

The revified model rebuilds the layers of reversible stages (F and G each a half-width copy)
and reruns checkpointed layers in the backward, so a hook carried over would fire on copies of
other shapes, or twice a step; run while tracing, it would see fake tensors, or record proxies
and hide its block. `transform` therefore carries no hook: it removes them from its working
copy of the model (the caller's model keeps them) and warns, naming their modules. torch's own
weight reparametrisations that live in hooks (`weight_norm`, `spectral_norm`) are part of what
the layer computes, not observers: they stay. A spectral norm (either form) runs its power
iteration in the forward only (`rerun_safe_spectral_norms`), so that a rerun computes the
forward's weight.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from revify.runtime.modes import rerunning_enabled

HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# Per-hook flags kept beside the hooks, by the same handle id.
HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")
COMPUTING_HOOKS = (WeightNorm, SpectralNorm)


def drop_hooks(model: nn.Module) -> list[str]:
    """Remove the hooks of `model` and its submodules (those of COMPUTING_HOOKS stay); returns
    the names of the modules that had some (the model itself by its class name)."""
    names = []
    for name, module in model.named_modules():
        if _drop_own_hooks(module):
            names.append(name or type(model).__name__)
    return names


def _drop_own_hooks(module: nn.Module) -> bool:
    dropped = False
    for attr in HOOKS:
        hooks = getattr(module, attr, None) or {}
        for key in [k for k, hook in hooks.items() if not isinstance(hook, COMPUTING_HOOKS)]:
            del hooks[key]
            for flags in HOOK_FLAGS:
                getattr(module, flags, {}).pop(key, None)
            dropped = True
    return dropped


def hooks_warning(names: list[str]) -> str:
    return (f"revify: hooks on {', '.join(names)} are not carried into the revified model (its "
            f"layers are rebuilt, and rerun in the backward); register them on the revified "
            f"model's modules instead.")


# ----------------------------------------------------------------------------- reparametrizations
class RerunSpectralNorm(SpectralNorm):
    """spectral_norm's hook without the power iteration in a rerun (a checkpointed unit's, in
    the backward; revify.runtime.modes.rerunning). The forward's iteration left u and v as its
    weight used them, so the rerun computes that weight again, bit for bit: a second iteration
    would change it, and the gradients with it. Outside reruns it is SpectralNorm."""

    def __call__(self, module: nn.Module, inputs) -> None:
        iterate = module.training and not rerunning_enabled()
        setattr(module, self.name, self.compute_weight(module, do_power_iteration=iterate))


class RerunSpectralNormParametrization(_SpectralNorm):
    """parametrizations.spectral_norm's module, likewise without its power iteration in a
    rerun."""

    def _power_method(self, weight_mat: torch.Tensor, n_power_iterations: int) -> None:
        if not rerunning_enabled():
            super()._power_method(weight_mat, n_power_iterations)


def rerun_safe_spectral_norms(model: nn.Module) -> None:
    """Give `model`'s spectral norms (both forms) their rerun-safe classes, in place."""
    for module in model.modules():
        if type(module) is _SpectralNorm:
            module.__class__ = RerunSpectralNormParametrization
        for hook in module._forward_pre_hooks.values():
            if type(hook) is SpectralNorm:
                hook.__class__ = RerunSpectralNorm


def recomputed_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights that COMPUTING_HOOKS set before each forward (plain attributes, not
    parameters). After a forward with gradients they are non-leaf tensors, which deepcopy
    refuses; a copy may hold anything in their place, since its hook sets them again before
    the copy's first forward."""
    return [w for module in model.modules() for hook in module._forward_pre_hooks.values()
            if isinstance(hook, COMPUTING_HOOKS)
            and isinstance(w := getattr(module, hook.name, None), torch.Tensor)]


def copy_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """copy.deepcopy(model, memo), also for a model with hook-based `weight_norm` or
    `spectral_norm` after a forward (their weights copied detached: see recomputed_weights)."""
    memo = {} if memo is None else memo
    for w in recomputed_weights(model):
        memo.setdefault(id(w), w.detach().clone())
    return copy.deepcopy(model, memo)
