"""Switches and context managers shared by reversible stages and checkpointed layers."""
from __future__ import annotations

import enum
import threading
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.autograd.variable import Variable

_local = threading.local()


class UnitMode(enum.Enum):
    """How a unit's backward runs (revify.plan.schedule chooses one per unit)."""
    LEAN = "lean"       # recompute the unit, its nested layers (revify.plan.lean) once more
    PLAIN = "plain"     # recompute the unit, its nested layers storing inside the rerun
    STORED = "stored"   # plain autograd: recompute nothing


@dataclass(frozen=True)
class UnitSchedule:
    """How one unit runs: its mode, and the kept layers (revify.runtime.keep, by layer name) whose
    outputs its forward keeps for the rerun (none: it keeps nothing). A unit reads it at
    every forward; `revify.rewrite.set_mode` sets it, once, from the schedule."""
    mode: UnitMode = UnitMode.LEAN
    kept: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.mode.value + (f", keeping {', '.join(sorted(self.kept))}" if self.kept else "")


@contextmanager
def plain_autograd():
    """Run revified models with plain autograd: store activations, rebuild nothing.

    The reference the reversible backward is tested against, and a debugging aid: inside this
    block a revified model computes the same function with ordinary autograd.
    """
    previous = getattr(_local, "plain", False)
    _local.plain = True
    try:
        yield
    finally:
        _local.plain = previous


def plain_autograd_enabled() -> bool:
    return getattr(_local, "plain", False)


_warned = False


def exact_backward():
    """Deprecated name of `plain_autograd` (it read as the exact reconstruction): warns once."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("revify.exact_backward() is now revify.plain_autograd(); the old name "
                      "will be removed", DeprecationWarning, stacklevel=2)
    return plain_autograd()


class _Switch:
    """A thread-local switch, on inside its `with` block (re-entrant)."""
    name = ""

    def __enter__(self):
        self.previous = getattr(_local, self.name, False)
        setattr(_local, self.name, True)
        return self

    def __exit__(self, *exc):
        setattr(_local, self.name, self.previous)
        return False


class discarding(_Switch):
    """A checkpoint's first forward: what autograd saves is dropped (and recomputed later), so
    a tensor computed only to be saved (a masked ReLU's mask) need not be computed."""
    name = "discarding"


def discarding_enabled() -> bool:
    return getattr(_local, "discarding", False)


class rerunning(_Switch):
    """A forward run again (a reversible branch or a checkpointed unit in the backward, a
    stage's repeated attempt): BatchNorms called through revify.runtime.fast leave their
    statistics as the first run updated them (see `frozen_buffers`)."""
    name = "rerunning"


def rerunning_enabled() -> bool:
    return getattr(_local, "rerunning", False)


class Slots:
    """Where a module's parameters and buffers live (the owning module's dict and the name),
    found by one walk of the module: reading them through their slots each step sees a
    replaced tensor (a module moved to another device, a state dict loaded with assign=True,
    sharding) and walks nothing. Submodules added after the first use are not seen: the
    rewritten units are not edited after the rewrite. `buffers`: those a rerun must put back
    (`frozen_buffers`), every buffer but those of layers that leave their own alone on a
    rerun (a class with `rerun_safe`) or that a rewritten graph calls through a function that
    does (one marked `rerun_safe`, revify.runtime.fast)."""

    def __init__(self, module: nn.Module):
        self.params, self.buffers, seen = [], [], set()
        safe = _rerun_safe_layers(module)
        for m in module.modules():
            stores = [(self.params, m._parameters)]
            if m not in safe:
                stores.append((self.buffers, m._buffers))
            for slots, store in stores:
                for name, t in store.items():
                    if t is None or id(t) not in seen:  # a shared tensor once; None slots kept
                        seen.add(id(t))                 # (a bias may be given later)
                        slots.append((store, name))
        self._aliases, self._pointers = None, None

    def parameters(self) -> list[torch.Tensor]:
        found = [store[name] for store, name in self.params]
        return [p for p in found if p is not None]

    def buffer_aliases(self) -> list[list[torch.Tensor]]:
        """`.data` aliases of the buffers (writing through them leaves version counters
        alone), grouped by dtype (one foreach op each); made again when a buffer was replaced."""
        found = [store[name] for store, name in self.buffers]
        buffers = [b for b in found if b is not None]
        pointers = [b.untyped_storage()._cdata for b in buffers]
        if pointers != self._pointers:
            groups: dict[torch.dtype, list[torch.Tensor]] = {}
            for b in buffers:
                groups.setdefault(b.dtype, []).append(b.data)
            self._aliases, self._pointers = list(groups.values()), pointers
        return self._aliases


def graphs_in(module: nn.Module) -> list[fx.GraphModule]:
    """Every torch.fx graph module in `module`: its submodules' and those of checkpoints nested
    in a unit, which are not registered (revify.runtime.checkpoint.Checkpointed, owned=False)."""
    found = {}
    for m in module.modules():
        for gm in (m, m.__dict__.get("module")):
            if isinstance(gm, fx.GraphModule):
                found[id(gm)] = gm
    return list(found.values())


def _rerun_safe_layers(module: nn.Module) -> set[nn.Module]:
    """The layers of `module` whose buffers a rerun leaves as they are: those of a class marked
    `rerun_safe`, and those its graphs call through a function marked `rerun_safe` (found in
    the graphs themselves: a copy or an unpickled model finds them again)."""
    found = {m for m in module.modules() if getattr(type(m), "rerun_safe", False)}
    for gm in graphs_in(module):
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "rerun_safe", False) \
                    and node.args and getattr(node.args[0], "op", None) == "get_attr":
                found.add(gm.get_submodule(node.args[0].target))
    return found


_slots: "weakref.WeakKeyDictionary[nn.Module, Slots]" = weakref.WeakKeyDictionary()


def slots(module: nn.Module) -> Slots:
    """The module's Slots, found on first use."""
    found = _slots.get(module)
    if found is None:
        found = _slots[module] = Slots(module)
    return found


class frozen_buffers:
    """A rerun of `module` without net effect on its buffers: the forward updated running
    statistics already.

    The rerun runs the very same ops as the forward (so a BatchNorm takes the same kernel and
    rounds alike) and, with `switch`, runs `rerunning`: BatchNorms called through
    revify.runtime.fast then run with momentum 0, which writes back the statistics they read,
    and count no batch. Every other buffer is put back on leaving as it was on entering: one
    foreach copy per dtype, through `.data` aliases (version counters stay, so tensors saved
    for a backward stay valid); with none, nothing is copied. A whole reversible stage's
    backward is one such block (`switch=False`: it switches `rerunning` on around each
    branch's rerun, not around the rest of the backward).
    """

    def __init__(self, module: nn.Module, switch: bool = True):
        self.module, self.switch = module, rerunning() if switch else None

    def __enter__(self):
        self.aliases = slots(self.module).buffer_aliases()
        self.saved = [torch._foreach_mul(group, 1) for group in self.aliases]  # exact copies
        if self.switch is not None:
            self.switch.__enter__()
        return self

    def __exit__(self, *exc):
        if self.switch is not None:
            self.switch.__exit__(*exc)
        for group, saved in zip(self.aliases, self.saved):
            torch._foreach_copy_(group, saved)
        self.aliases = self.saved = None
        return False


def capture_rng(device: torch.device):
    """The RNG state a recomputation must start from to draw the same dropout masks."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


NOTHING = nullcontext()  # what a replay with nothing to replay enters (shared: it holds nothing)


def replay_rng(state, device: torch.device):
    """Run with the captured RNG state, leaving the global RNG as it was afterwards."""
    return NOTHING if state is None else _ReplayRng(state, device)


class _ReplayRng:
    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device

    def __enter__(self):
        self.current = capture_rng(self.device)
        restore_rng(self.state, self.device)
        return self

    def __exit__(self, *exc):
        restore_rng(self.current, self.device)
        return False


def restore_rng(state, device: torch.device) -> None:
    """Set the global RNG back to a captured state (a forward run again draws the same masks)."""
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def capture_autocast(device: torch.device):
    kind = device.type
    try:
        return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type without autocast (meta): nothing to replay
        return None


def replay_autocast(state):
    """Run under a captured autocast state (nothing to enter where it is the current one)."""
    if state is None:
        return NOTHING
    kind, enabled, dtype = state
    if enabled == torch.is_autocast_enabled(kind) and \
            (not enabled or dtype == torch.get_autocast_dtype(kind)):
        return NOTHING
    return torch.autocast(kind, dtype=dtype, enabled=enabled)


class Seed(torch.autograd.Function):
    """A stand-in for `out` as the root of a backward, which hands `out` the gradient `grad`:
    the backward can start after `out` itself has been released. It is a view of `grad` (alive
    anyway), so making it allocates and launches nothing."""

    @staticmethod
    def forward(ctx, out, grad):
        ctx.grad = grad
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        grad, ctx.grad = ctx.grad, None
        return grad, None


def grads_of(root: torch.Tensor, inputs: list[torch.Tensor]) -> tuple:
    """torch.autograd.grad(root, inputs, allow_unused=True) for a `root` whose backward ignores
    the gradient it is given (Seed: it is given itself): the engine called directly, without
    torch.autograd.grad's Python checks of every input (a dozen calls a branch)."""
    return Variable._execution_engine.run_backward(
        (root,), (root,), False, False, tuple(inputs), True, False)
