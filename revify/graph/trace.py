"""Step 1 of the pipeline: trace a model into an fx graph and annotate every node with its shape.

Tracing happens on a deep copy in eval mode: timm's drop_path and similar train-only branches
would otherwise bake a random decision into the graph. Shapes come from running the graph on
fake tensors, so nothing is allocated and no BatchNorm statistic is touched.
"""
from __future__ import annotations

import inspect
import logging
import operator
from collections import Counter
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from revify.graph.hooks import copy_model, drop_hooks, rerun_safe_spectral_norms
from revify.graph.ops import mode_arguments, mode_module
from revify.plan.resize import RESIZERS


class TraceError(ValueError):
    """The model could not be traced; the message says where and how to proceed."""


class _Tracer(fx.Tracer):
    """fx tracer that keeps user-chosen module types or names as opaque leaves.

    Subclasses of layers revify can resize (timm's BatchNormAct2d, StdConv2d) and the timm
    layers it has rules for are leaves too: traced into, they would show their bare weights
    and shape asserts instead of one resizable layer.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return isinstance(m, tuple(RESIZERS)) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Remember the innermost module that failed, to name it in the error.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


MAX_OPAQUE = 16  # modules made opaque automatically before giving up
MODE_DEPENDENT = "runs different code in training and in eval mode"


def _defaults(model: nn.Module, num_inputs: int) -> dict:
    """Arguments of `forward` past the example inputs, fixed at their defaults.

    timm's ViT takes `attn_mask=None`: traced as a placeholder it would feed every attention
    layer, and no block could be found between two residual adds.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    fixed = {}
    for k, p in enumerate(params):
        past = k >= num_inputs or p.kind == p.KEYWORD_ONLY
        if past and p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                            p.KEYWORD_ONLY):
            fixed[p.name] = p.default
    return fixed


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = (),
          num_inputs: int = 1) -> fx.GraphModule:
    """Trace a deep copy of `model` in eval mode; the caller's model is never modified.

    A submodule fx cannot trace (data-dependent control flow, say) is retried as an opaque
    leaf: always safe, since an opaque layer with weights is not resizable and its block is
    then checkpointed, with the reason in the plan. So is a submodule whose traced code differs
    between training and eval mode (`if self.training:`): traced once, it would keep one mode's
    behaviour for good; as a leaf it reads its flag when it runs. Code that differs only in the
    flag it passes (`F.dropout(x, p, training=self.training)`) is traced through instead: the
    call becomes its module form (`nn.Dropout`), which reads the flag when it runs.
    `gm.meta["opaque"]` says which modules and why; `gm.meta["hooked"]` names the
    modules whose hooks were left out (revify.graph.hooks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revify.transform expects a torch.nn.Module, got {type(model).__name__}.")
    model = copy_model(model)
    hooked = drop_hooks(model)  # they must not run on proxies and fake tensors (revify.graph.hooks)
    rerun_safe_spectral_norms(model)
    leaf_modules, opaque = list(leaf_modules), {}
    while True:
        graphs = {mode: _trace_in(model.train(mode), leaf_modules, opaque, num_inputs)
                  for mode in (True, False)}
        own = {mode: _own_nodes(graph) for mode, graph in graphs.items()}
        readers = _mode_readers(own[True], own[False])
        differing = {name: what for name, what in _mode_dependent(own[True], own[False]).items()
                     if name not in readers}
        if not differing:
            break
        if "" in differing:
            raise TraceError(f"{type(model).__name__}.forward itself runs different code in "
                             f"training and in eval mode ({differing['']}), which a traced "
                             f"graph cannot keep; move that code into a submodule.")
        if len(opaque) + len(differing) > MAX_OPAQUE:
            raise TraceError(f"{len(differing)} submodules of {type(model).__name__} run different "
                             f"code in training and eval mode ({', '.join(sorted(differing))}).")
        for name, what in differing.items():
            opaque[name] = f"{MODE_DEPENDENT} ({what})"
            leaf_modules.append(name)
    graph = graphs[False]
    model.eval()
    _read_mode_when_run(model, graph, readers)
    _drop_asserts(graph)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.meta["opaque"] = opaque
    gm.meta["hooked"] = hooked
    return gm


def _trace_in(model: nn.Module, leaf_modules: list, opaque: dict, num_inputs: int) -> fx.Graph:
    """One trace; a submodule fx fails in, or one that updates a buffer in place, becomes an
    opaque leaf (both lists grow) and we retry. (`self.count.add_(1)` runs on the real tensor
    at the trace and is not recorded: the graph would never update it; recorded updates are
    refused too, see `_traced_writers`.)"""
    while True:
        tracer = _Tracer(leaf_modules)
        try:
            with _buffers_put_back(model) as written:
                graph = tracer.trace(model, concrete_args=_defaults(model, num_inputs))
        except Exception as exc:  # fx raises many kinds; all mean the same thing to the user
            where = tracer.failed_in
            if not where or where in opaque or len(opaque) >= MAX_OPAQUE:
                raise _trace_error(model, where, exc) from exc
            opaque[where] = _first_line(exc)
            leaf_modules.append(where)
            continue
        writers = {**written, **_traced_writers(graph)}
        if not writers:
            return graph
        for owner, buffer in writers.items():
            if not owner or owner in opaque or len(opaque) >= MAX_OPAQUE:
                raise TraceError(f"{type(model).__name__}: '{owner or 'forward'}' updates the "
                                 f"tensor '{buffer}' in place, which a traced graph cannot "
                                 f"keep; move that update into a submodule.")
            opaque[owner] = f"updates its tensor '{buffer}' in place"
            leaf_modules.append(owner)


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _traced_writers(graph: fx.Graph) -> dict[str, str]:
    """The modules whose traced code updates a buffer or parameter in place (`self.n += 1`,
    `self.avg.mul_(m)`), each with the tensor's name. Recorded, such an update would still be
    lost or repeated: a checkpointed unit must not overwrite its inputs (they are copied first)
    and its rerun would update the tensor again. As a leaf the module updates it in its own
    forward, which the rerun's buffer restore covers."""
    writers = {}
    for node in graph.nodes:
        name = getattr(node.target, "__name__", node.target)
        in_place = node.target in _IN_PLACE_OPERATORS or \
            (isinstance(name, str) and name.endswith("_") and not name.endswith("__"))
        if node.op in ("call_method", "call_function") and in_place and node.args and \
                isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            writers.setdefault(_owner(node), node.args[0].target.rpartition(".")[2])
    return writers


@contextmanager
def _buffers_put_back(module: nn.Module):
    """Runs the block, then puts back every buffer of `module` it wrote to (code run on real
    tensors at a trace; fake tensor mode, which runs in-place ops on real tensors for real).
    Yields {module name: a buffer it wrote}, filled on leaving."""
    buffers = {name: (b, b._version, b.clone()) for name, b in module.named_buffers()}
    written: dict[str, str] = {}
    try:
        yield written
    finally:
        with torch.no_grad():
            for name, (buffer, version, saved) in buffers.items():
                if buffer._version != version:
                    buffer.copy_(saved)
                    owner, _, attr = name.rpartition(".")
                    written.setdefault(owner, attr)


def _owner(node: fx.Node) -> str:
    """The module whose own code traced `node` ("" for the root's forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _own_nodes(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Each module's own traced nodes, in order."""
    found: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        found.setdefault(_owner(node), []).append(node)
    return found


def _signature(node: fx.Node) -> tuple:
    """What a node does (op, target, constant arguments), not how it is wired: a difference
    upstream renames nodes downstream."""
    args = fx.node.map_arg((node.args, node.kwargs), lambda n: "%")
    return node.op, getattr(node.target, "__name__", str(node.target)), repr(args)


def _mode_dependent(train: dict, eval_: dict) -> dict[str, str]:
    """Modules whose own traced ops differ between the two graphs, with the ops that differ."""
    differing = {}
    for owner in train.keys() | eval_.keys():
        a = Counter(_signature(n) for n in train.get(owner, []))
        b = Counter(_signature(n) for n in eval_.get(owner, []))
        if a != b:
            differing[owner] = _differing_ops(a, b)
    return differing


def _differing_ops(train: Counter, eval_: Counter) -> str:
    """"in training: add, randn_like; in eval: dropout": the ops one mode runs and the other not
    (or not with the same arguments)."""
    def names(ops: Counter) -> str:
        return ", ".join(sorted({name for _, name, _ in ops}))
    only_train, only_eval = names(train - eval_), names(eval_ - train)
    return "; ".join(part for part in (only_train and f"in training: {only_train}",
                                       only_eval and f"in eval: {only_eval}") if part)


def _mode_readers(train: dict, eval_: dict) -> dict[str, list[fx.Node]]:
    """Modules whose traced code differs between modes only in the `training` flag passed to
    functions that have a module form (`F.dropout(x, p, training=self.training)`), with the
    eval graph's nodes that pass it: those nodes become that module (ops.MODE_MODULES)."""
    readers = {}
    for owner in train.keys() & eval_.keys():
        if len(train[owner]) != len(eval_[owner]):
            continue
        pairs = list(zip(train[owner], eval_[owner]))
        flagged = [e for t, e in pairs if _reads_mode(t, e)]
        if flagged and all(_signature(t) == _signature(e) for t, e in pairs
                           if not _reads_mode(t, e)):
            readers[owner] = flagged
    return readers


def _reads_mode(train: fx.Node, eval_: fx.Node) -> bool:
    """The same call, with training=True traced in training and training=False in eval."""
    a, b = mode_arguments(train), mode_arguments(eval_)
    if a is None or b is None or train.target is not eval_.target or mode_module(eval_) is None:
        return False

    def settings(args):  # inputs are other nodes in the other graph: compared as "%"
        return repr(fx.node.map_arg({k: v for k, v in args.items() if k != "training"},
                                    lambda n: "%"))
    return settings(a) == settings(b) and a["training"] is True and b["training"] is False


def _read_mode_when_run(model: nn.Module, graph: fx.Graph, readers: dict[str, list[fx.Node]]):
    """Replace each flag-passing call by its module form, registered on the module whose code
    made the call (so the block keeps its name), reading its mode when it runs."""
    for owner, nodes in readers.items():
        parent = model.get_submodule(owner)
        for node in nodes:
            module, source = mode_module(node)
            attr = _free_attribute(parent, node.target.__name__)
            parent.add_module(attr, module.train(parent.training))
            with graph.inserting_before(node):
                call = graph.call_module(f"{owner}.{attr}" if owner else attr, (source,))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)


def _free_attribute(module: nn.Module, base: str) -> str:
    name, k = base, 1
    while hasattr(module, name):
        name, k = f"{base}_{k}", k + 1
    return name


# Pure ops that only feed shape asserts (x.ndim == 4, x.shape[1] == n): removed with them.
_ASSERT_INPUTS = {getattr, operator.getitem, operator.eq, operator.ne, operator.lt,
                  operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.not_}


_ASSERTS = {torch._assert, fx._symbolic_trace._assert_is_none}


def _drop_asserts(graph: fx.Graph) -> None:
    """Remove asserts, unused pure lookups (`x, _ = attention(x)`) and what only they use:
    side branches off a residual branch would otherwise hide the block (its inner values
    look used outside it)."""
    doomed = [n for n in graph.nodes if n.op == "call_function" and (
        n.target in _ASSERTS or (n.target in _ASSERT_INPUTS and not n.users))]
    erased = set()
    while doomed:
        node = doomed.pop()
        if node in erased:
            continue
        erased.add(node)
        inputs = node.all_input_nodes
        graph.erase_node(node)
        doomed += [i for i in inputs if not i.users and i.op in ("call_function", "call_method")
                   and (i.target in _ASSERT_INPUTS or i.target in ("size", "dim"))]


def _trace_error(model: nn.Module, where: str | None, exc: Exception) -> TraceError:
    if not where:
        return TraceError(f"torch.fx could not trace the forward of {type(model).__name__}: "
                          f"{_first_line(exc)}. Make the failing code traceable (see torch.fx "
                          f"limitations) or move it into a submodule and pass it as leaf_modules=.")
    return TraceError(
        f"torch.fx could not trace {type(model).__name__}: in module '{where}': "
        f"{_first_line(exc)}. Pass leaf_modules=['{where}'] (or its class) to "
        f"revify.transform to treat it as an opaque layer.")


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
    cannot run on fake tensors; then the graph runs once for real, without gradients. Either
    way the buffers are put back afterwards: a layer may update its own (a counter), and fake
    tensor mode writes to real tensors for real. (Eval mode already keeps BatchNorm from
    writing any.)
    """
    with _buffers_put_back(gm):
        _run_for_shapes(gm, example_inputs)


def _run_for_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
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
