"""Step 1 of the pipeline: trace a model into an fx graph and annotate every node with its shape.

Tracing happens on a deep copy in eval mode: timm's drop_path and similar train-only branches
would otherwise bake a random decision into the graph. Shapes come from running the graph on
fake tensors, so nothing is allocated and no BatchNorm statistic is touched.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode


class TraceError(ValueError):
    """The model could not be traced; the message says where and how to proceed."""


class _Tracer(fx.Tracer):
    """fx tracer that keeps user-chosen module types or names as opaque leaves."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Remember the innermost module that failed, to name it in the error.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = ()) -> fx.GraphModule:
    """Trace a deep copy of `model` in eval mode; the caller's model is never modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revify.transform expects a torch.nn.Module, got {type(model).__name__}.")
    model = copy.deepcopy(model).eval()
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds; all mean the same thing to the user
        where = tracer.failed_in
        if not where:
            raise TraceError(f"torch.fx could not trace the forward of {type(model).__name__}: "
                             f"{_first_line(exc)}. Make the failing code traceable (see torch.fx "
                             f"limitations) or move it into a submodule and pass it as leaf_modules=.") from exc
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: in module '{where}': "
            f"{_first_line(exc)}. Pass leaf_modules=['{where}'] (or its class) to "
            f"revify.transform to treat it as an opaque layer.") from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta["shape"] = tuple(result.shape)
            node.meta["dtype"] = result.dtype
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record `node.meta['shape']` for every tensor-valued node.

    Runs on fake tensors (nothing allocated). A leaf module whose control flow depends on values
    cannot run on fake tensors; then the graph runs once for real, without gradients. The module
    is in eval mode here, so BatchNorm reads its running statistics and writes nothing.
    """
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a shape error is reported below, in one sentence
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _ShapeRecorder(gm).run(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                     for t in example_inputs))
        return
    except DataDependentOutputException:
        pass
    except Exception as exc:
        raise _shape_error(example_inputs, exc) from exc
    finally:
        quiet.setLevel(level)
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*(torch.randn_like(t) if isinstance(t, torch.Tensor) else t
                                     for t in example_inputs))
    except Exception as exc:
        raise _shape_error(example_inputs, exc) from exc


def _shape_error(example_inputs, exc: Exception) -> TraceError:
    shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
    return TraceError(f"running the traced graph on an example input of shape {shapes} failed: "
                      f"{_first_line(exc)}. Pass example_inputs= (or input_size=) matching what "
                      f"the model expects.")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].rstrip('.') if text else ''}"
