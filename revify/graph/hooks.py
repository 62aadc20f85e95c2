"""Module hooks users registered before `transform`: one defined behaviour.

The revified model rebuilds the layers of reversible stages (F and G each a half-width copy)
and reruns checkpointed layers in the backward, so a hook carried over would fire on copies of
other shapes, or twice a step; run while tracing, it would see fake tensors, or record proxies
and hide its block. `transform` therefore carries no hook: it removes them from its working
copy of the model (the caller's model keeps them) and warns, naming their modules. torch's own
weight reparametrisations that live in hooks (`weight_norm`, `spectral_norm`) are part of what
the layer computes, not observers: they stay.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

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
