"""Which tensors of a residual branch must share a channel count, and what each becomes.

Channel counts form classes: a BatchNorm's output is in its input's class, an elementwise op
joins its operands' classes (a per-channel parameter among them), a Conv starts a new class.
The branch input and output are the *stream* class (halved by the coupling); every other class
is an internal width, scaled to keep the parameter count where the user wants it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx

from .ops import (POSITION_FREE_MODULES, is_channel_agnostic, is_reduction, is_reshape,
                  op_name, permute_dims, spatial_dims)
from .resize import holds_state, resizer_for


def inner_key(node: str) -> str:
    """Where a layer's own width (see `Resizer.inner`) is kept among the node widths."""
    return f"{node}:inner"


def _alignment(width: float) -> int:
    """What a rebuilt width is rounded to a multiple of: 8 (tensor cores), and for wide layers
    the largest power of two up to an eighth of it, at most 32, so that rounding moves it by
    at most 6%. CPU convolution kernels block channels by 16 and more: oneDNN runs a ResNet-50
    layer4 branch 20% slower at 392 channels than at 384 (AVX-512, forward and backward)."""
    return max(8, min(32, 2 ** math.floor(math.log2(width / 8)))) if width >= 128 else 8


class Unresizable(Exception):
    """The branch cannot be rebuilt at half width; the message is the reason shown in the plan."""


@dataclass
class BranchChannels:
    node_class: dict[str, int]                 # node name -> channel class
    sizes: dict[int, int]                      # class -> original channel count
    divisors: dict[int, int] = field(default_factory=dict)  # class -> channels must divide by
    stream: int = 0                            # class of the branch input and output

    def widths(self, stream_channels: int, scale: float) -> dict[str, int]:
        """New channel count of every branch node: the stream at `stream_channels`, the rest scaled."""
        new = {}
        for cls, size in self.sizes.items():
            div = self.divisors.get(cls, 1)
            if cls == self.stream:
                if stream_channels % div:
                    raise Unresizable(f"half the channels ({stream_channels}) is not a multiple of {div}")
                new[cls] = stream_channels
            else:
                align = math.lcm(div, _alignment(size * scale)) if size * scale >= 32 else div
                new[cls] = max(align, round(size * scale / align) * align)
        return {name: new[cls] for name, cls in self.node_class.items()}


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def make(self) -> int:
        k = len(self.parent)
        self.parent[k] = k
        return k

    def find(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        self.parent[rb] = ra
        return ra


def _channels(node: fx.Node, dim: int) -> int | None:
    """The channel count of `node` whose channels sit at `dim` of its shape."""
    shape = node.meta.get("shape")
    return shape[dim] if shape is not None and len(shape) > dim else None


def _rank(node: fx.Node) -> int:
    return len(node.meta.get("shape") or ())


def _vector_axis(shape) -> int | None:
    """The one dim of a per-channel vector ((C,), (C, 1, 1), (1, C, 1, 1)), else None."""
    big = [d for d, n in enumerate(shape or ()) if n != 1]
    return big[0] if len(big) == 1 else None


def _module_axis(rule, module, dim: int) -> int | None:
    """The input dim a module works on; None: any (it treats every element alike).

    A rule that does not say what channel count it expects is trusted only where the channels
    sit at the stream's dim, unless the module is known to be elementwise.
    """
    if rule.channels_in(module) is not None:
        return rule.axis
    return None if isinstance(module, POSITION_FREE_MODULES) else dim


def _moved_position(node: fx.Node, modules, pos: int, source: fx.Node) -> int | None:
    """Where a layout op puts the channel axis (at `pos` in `source`); None: not a layout op."""
    dims = permute_dims(node, modules)
    if dims is not None:
        return [d % len(dims) for d in dims].index(pos)
    if not is_reshape(node):
        return None
    # Only a per-channel vector may be re-shaped (gamma.reshape(1, -1, 1, 1)): any other
    # reshape mixes the channels with other dims. A literal channel count would not follow.
    new = _vector_axis(node.meta.get("shape"))
    spec = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(spec) == 1 and isinstance(spec[0], (list, tuple)):
        spec = spec[0]
    if _vector_axis(source.meta.get("shape")) != pos or new is None or \
            (new < len(spec) and isinstance(spec[new], int) and spec[new] != -1):
        raise Unresizable(f"'{node.name}' ({op_name(node)}) re-shapes the channels")
    return new


def _agnostic_position(node: fx.Node, inputs: list[fx.Node], pos: dict[str, int]) -> int:
    """Where the channels of a channel-agnostic op's result sit."""
    rank = _rank(node)
    if is_reduction(node):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        p, src = pos[inputs[0].name], _rank(inputs[0])
        dims = [dims] if isinstance(dims, int) else list(dims or range(src))
        if not all(isinstance(d, int) for d in dims):
            raise Unresizable(f"'{node.name}' ({op_name(node)}) reduces over run-time dims")
        dims = {d % src for d in dims}
        if p in dims:
            raise Unresizable(f"'{node.name}' ({op_name(node)}) reduces over the channels")
        return p if keep else p - sum(d < p for d in dims)
    # Broadcasting aligns shapes from the right; an operand with one channel broadcasts over them.
    found = {pos[i.name] + rank - _rank(i) for i in inputs if _channels(i, pos[i.name]) != 1} or \
        {pos[inputs[0].name] + rank - _rank(inputs[0])}
    if len(found) > 1:
        raise Unresizable(f"'{node.name}' ({op_name(node)}) combines tensors whose channels sit "
                          f"on different dims")
    p = found.pop()
    if p >= rank - spatial_dims(node):
        raise Unresizable(f"'{node.name}' ({op_name(node)}) pools over the channels")
    return p


def analyze_branch(gm: fx.GraphModule, entry: str, branch: list[str], output: str,
                   dim: int = 1) -> BranchChannels:
    """Assign a channel class to every node of the branch `entry -> ... -> output`.

    Every node's channels sit at some dim of its shape (`pos`): `dim` at the entry, moved by
    permutes, kept by everything else. A layer must find them where it works (a Linear: last).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    cls: dict[str, int] = {entry: uf.make()}
    pos: dict[str, int] = {entry: dim}
    size: dict[int, int] = {cls[entry]: _channels(nodes[entry], dim)}
    divisors: dict[int, int] = {}

    def join(a: int, b: int, what: str) -> int:
        if size[uf.find(a)] != size[uf.find(b)]:
            raise Unresizable(f"{what} combines tensors of different channel counts")
        root = uf.union(a, b)
        size[root] = size[uf.find(a)]
        return root

    def require(c: int, d: int):
        if d > 1:
            divisors[c] = math.lcm(divisors.get(c, 1), d)

    for name in branch:
        node = nodes[name]
        if node.op == "get_attr":
            # A per-channel parameter (layer scale): it joins the class of what it multiplies.
            pos[name] = _vector_axis(node.meta.get("shape"))
            if pos[name] is None:
                raise Unresizable(f"the branch uses a tensor attribute '{node.target}' that is not "
                                  f"a per-channel vector")
            cls[name] = uf.make()
            size[cls[name]] = _channels(node, pos[name])
            continue
        inputs = [i for i in node.all_input_nodes if i.name in cls]
        if not inputs:
            raise Unresizable(f"'{name}' ({op_name(node)}) has no branch input")
        moved = _moved_position(node, modules, pos[inputs[0].name], inputs[0])
        if moved is not None:  # a layout op: same channels, elsewhere
            pos[name], cls[name] = moved, cls[inputs[0].name]
            continue
        if node.op == "call_module":
            module = modules[node.target]
            if node.target in gm.meta.get("opaque", {}):
                why = gm.meta["opaque"][node.target]
                hint = "" if holds_state(module) else \
                    " (if it does, a drop path say, name it in leaf_modules)"
                raise Unresizable(f"'{node.target}' is kept opaque ({why}), so revify cannot "
                                  f"tell whether it treats channels alike{hint}")
            rule = resizer_for(module)
            if rule is None:
                raise Unresizable(f"no resize rule for {type(module).__name__} ('{node.target}')")
            if len(inputs) != 1:
                raise Unresizable(f"module '{node.target}' takes {len(inputs)} branch tensors")
            p = pos[name] = pos[inputs[0].name]
            axis = _module_axis(rule, module, dim)
            expected = rule.channels_in(module)
            if (axis is not None and axis % _rank(inputs[0]) != p) or \
                    (expected is not None and expected != _channels(inputs[0], p)):
                raise Unresizable(f"'{node.target}' works on another dimension than channels "
                                  f"(dim {p})")
            channels = _channels(node, p)
            if channels is None:
                raise Unresizable(f"'{name}' ({op_name(node)}) drops the channel dim")
            if rule.ties(module):
                if channels != size[uf.find(cls[inputs[0].name])]:
                    raise Unresizable(f"'{node.target}' changes the channel count")
                cls[name] = cls[inputs[0].name]
            else:
                cls[name] = uf.make()
                size[cls[name]] = channels
            require(uf.find(cls[inputs[0].name]), rule.divisor(module))
            require(uf.find(cls[name]), rule.divisor(module))
            if rule.inner is not None:  # the layer's own width (attention heads): a class alone
                width, divisor = rule.inner(module)
                cls[inner_key(name)] = uf.make()
                size[cls[inner_key(name)]] = width
                require(cls[inner_key(name)], divisor)
        elif is_channel_agnostic(node):
            pos[name] = _agnostic_position(node, inputs, pos)
            channels = _channels(node, pos[name])
            if channels is None:
                raise Unresizable(f"'{name}' ({op_name(node)}) drops the channel dim")
            cls[name] = uf.make()
            size[cls[name]] = channels
            for inp in inputs:
                if _channels(inp, pos[inp.name]) == 1 and channels != 1:
                    continue  # broadcast over channels (e.g. a spatial gate)
                cls[name] = join(cls[name], cls[inp.name], op_name(node))
        else:
            raise Unresizable(f"op '{op_name(node)}' ('{name}') is not known to treat channels alike")
    if pos[output] != dim % max(_rank(nodes[output]), 1):
        raise Unresizable(f"the branch returns its channels on dim {pos[output]}, not {dim}")
    stream = join(cls[entry], cls[output], "the residual add")
    roots = {name: uf.find(c) for name, c in cls.items()}
    # Divisors were recorded on roots that may have merged since: fold them onto final roots.
    final_div: dict[int, int] = {}
    for c, d in divisors.items():
        r = uf.find(c)
        final_div[r] = math.lcm(final_div.get(r, 1), d)
    return BranchChannels(node_class=roots, sizes={r: size[r] for r in set(roots.values())},
                          divisors=final_div, stream=uf.find(stream))
