"""Step 1 of the pipeline: trace a model into an fx graph and annotate every node with its shape.

Tracing happens on a deep copy in eval mode: timm's drop_path and similar train-only branches
would otherwise bake a random decision into the graph. Shapes come from running the graph on
fake tensors, so nothing is allocated and no BatchNorm statistic is touched.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode


class TraceError(ValueError):
    """The model could not be traced; the message says where and how to proceed."""


class _Tracer(fx.Tracer):
    """fx tracer that keeps user-chosen module types or names as opaque leaves."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        # Remember where we are so a failure can name the module that broke tracing.
        self.module_stack_names.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.module_stack_names.pop()


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = ()) -> fx.GraphModule:
    """Trace a deep copy of `model` in eval mode; the caller's model is never modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revify.transform expects a torch.nn.Module, got {type(model).__name__}.")
    model = copy.deepcopy(model).eval()
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds; all mean the same thing to the user
        where = tracer.module_stack_names[-1] if tracer.module_stack_names else "the top-level forward"
        where = where or "the top-level forward"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: in module '{where}': "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Pass leaf_modules=['{where}'] (or its class) to revify.transform to treat it as "
            f"an opaque layer."
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta["shape"] = tuple(result.shape)
            node.meta["dtype"] = result.dtype
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record `node.meta['shape']` for every tensor-valued node, running on fake tensors.

    The module is in eval mode here, so BatchNorm reads its running statistics and writes nothing.
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs)
        try:
            _ShapeRecorder(gm).run(*fakes)
        except Exception as exc:
            raise TraceError(
                f"running the traced graph on an example input of shape "
                f"{[tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]} failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                f"Pass example_inputs= (or input_size=) matching what the model expects."
            ) from exc
