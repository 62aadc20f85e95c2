"""Which tensors of a residual branch must share a channel count, and what each becomes.

Channel counts form classes: a BatchNorm's output is in its input's class, an elementwise op
joins its operands' classes, a Conv starts a new class. The branch input and output are the
*stream* class (halved by the coupling); every other class is an internal width, scaled to keep
the parameter count where the user wants it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx

from .ops import is_channel_agnostic, op_name
from .resize import resizer_for


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
                align = math.lcm(div, 8) if size * scale >= 32 else div  # 8: tensor-core friendly
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
    shape = node.meta.get("shape")
    return shape[dim] if shape is not None and len(shape) > dim else None


def analyze_branch(gm: fx.GraphModule, entry: str, branch: list[str], output: str,
                   dim: int = 1) -> BranchChannels:
    """Assign a channel class to every node of the branch `entry -> ... -> output`."""
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    cls: dict[str, int] = {entry: uf.make()}
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
            raise Unresizable(f"the branch uses a bare tensor attribute '{node.target}'")
        channels = _channels(node, dim)
        if channels is None:
            raise Unresizable(f"'{name}' ({op_name(node)}) does not produce a channel-first tensor")
        inputs = [i for i in node.all_input_nodes if i.name in cls]
        if node.op == "call_module":
            module = modules[node.target]
            if node.target in gm.meta.get("opaque", {}):
                raise Unresizable(f"'{node.target}' could not be traced, so revify cannot tell "
                                  f"whether it treats channels alike")
            rule = resizer_for(module)
            if rule is None:
                raise Unresizable(f"no resize rule for {type(module).__name__} ('{node.target}')")
            if len(inputs) != 1:
                raise Unresizable(f"module '{node.target}' takes {len(inputs)} branch tensors")
            expected = rule.channels_in(module)
            if expected is not None and expected != _channels(inputs[0], dim):
                raise Unresizable(f"'{node.target}' works on another dimension than channels "
                                  f"(dim {dim})")
            if rule.ties(module):
                if channels != size[uf.find(cls[inputs[0].name])]:
                    raise Unresizable(f"'{node.target}' changes the channel count")
                cls[name] = cls[inputs[0].name]
            else:
                cls[name] = uf.make()
                size[cls[name]] = channels
            require(uf.find(cls[inputs[0].name]), rule.divisor(module))
            require(uf.find(cls[name]), rule.divisor(module))
        elif is_channel_agnostic(node):
            if not inputs:
                raise Unresizable(f"'{name}' ({op_name(node)}) has no branch input")
            cls[name] = uf.make()
            size[cls[name]] = channels
            for inp in inputs:
                if _channels(inp, dim) == 1 and channels != 1:
                    continue  # broadcast over channels (e.g. a spatial gate)
                cls[name] = join(cls[name], cls[inp.name], op_name(node))
        else:
            raise Unresizable(f"op '{op_name(node)}' ('{name}') is not known to treat channels alike")
    stream = join(cls[entry], cls[output], "the residual add")
    roots = {name: uf.find(c) for name, c in cls.items()}
    # Divisors were recorded on roots that may have merged since: fold them onto final roots.
    final_div: dict[int, int] = {}
    for c, d in divisors.items():
        r = uf.find(c)
        final_div[r] = math.lcm(final_div.get(r, 1), d)
    return BranchChannels(node_class=roots, sizes={r: size[r] for r in set(roots.values())},
                          divisors=final_div, stream=uf.find(stream))
