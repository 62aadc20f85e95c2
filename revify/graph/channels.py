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

from revify.graph.ops import (POSITION_FREE_MODULES, is_channel_agnostic, is_getitem, is_reduction,
                              is_reshape, is_shape_read, op_name, permute_dims, shape_read_dims,
                              spatial_dims)
from revify.plan.resize import holds_state, reparametrized, resizer_for


def inner_key(node: str) -> str:
    """Where a layer's own width (see `Resizer.inner`) is kept among the node widths."""
    return f"{node}:inner"


def groups_key(node: str) -> str:
    """Where a grouped layer's new group count is kept among the node widths."""
    return f"{node}:groups"


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
    # grouped layer node -> (class, group width): its groups follow the width (RegNet's convs)
    group_widths: dict[str, tuple[int, int]] = field(default_factory=dict)

    def widths(self, stream_channels: int, scale: float) -> dict[str, int]:
        """New channel count of every branch node: the stream at `stream_channels`, the rest
        scaled."""
        new = {}
        for cls, size in self.sizes.items():
            div = self.divisors.get(cls, 1)
            if cls == self.stream:
                if stream_channels % div:
                    raise Unresizable(f"half the channels ({stream_channels}) is not a multiple "
                                      f"of {div}")
                new[cls] = stream_channels
            else:
                new[cls] = _rounded(size * scale, div)
        widths = {name: new[cls] for name, cls in self.node_class.items()}
        widths.update({groups_key(name): new[cls] // width
                       for name, (cls, width) in self.group_widths.items()})
        return widths

    def internal(self, widths: dict[str, int]) -> tuple[int, int]:
        """(new, original) channel counts of the branch's internal layers (all but the
        stream's) at `widths` (from `self.widths`), one count per channel class."""
        new = {cls: widths[name] for name, cls in self.node_class.items()}
        inside = [cls for cls in self.sizes if cls != self.stream]
        return sum(new[cls] for cls in inside), sum(self.sizes[cls] for cls in inside)


def _rounded(width: float, divisor: int) -> int:
    """`width` rounded to a multiple of `divisor`, and of the alignment where their common
    multiple is at most an eighth of the width (rounding moves it by at most 6%): coarser steps
    cannot keep a stage's parameter count. 19 groups (RegNet's 152 channels at a group width of
    8) and an alignment of 16 would make it 304 channels; a CIFAR bottleneck's 36 channels
    aligned to 8 would be 32 or 40, its 3x3 convolution's parameters -21% or +23%."""
    aligned = math.lcm(divisor, _alignment(width)) if width >= 32 else divisor
    align = aligned if aligned <= max(divisor, width / 8) else divisor
    return max(align, round(width / align) * align)


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


def _moved_position(node: fx.Node, modules, pos: int, source: fx.Node,
                    reads: dict) -> tuple[int, list[int]] | None:
    """Where a layout op puts the channel axis (at `pos` in `source`), and the classes of the
    channel counts it is given; None: not a layout op."""
    dims = permute_dims(node, modules)
    if dims is not None:
        return [d % len(dims) for d in dims].index(pos), []
    return _reshaped_position(node, pos, source, reads) if is_reshape(node) else None


def _reshaped_position(node: fx.Node, pos: int, source: fx.Node,
                       reads: dict) -> tuple[int, list[int]]:
    """A reshape may merge or split the other dims (`x.view(b, c, -1)`, `gamma.view(1, -1, 1, 1)`)
    but must keep the channel axis whole: as many elements before it as before. Its channel entry
    must follow the branch's new width: -1, or a read of that channel count (`x.size(1)`); a
    literal count would not."""
    old, new = source.meta.get("shape"), node.meta.get("shape")
    if old is None or new is None:
        raise Unresizable(f"'{node.name}' ({op_name(node)}) re-shapes to an unknown shape")
    before = math.prod(old[:pos])
    moved = next((k for k in range(len(new))
                  if math.prod(new[:k]) == before and new[k] == old[pos]), None)
    spec = _reshape_spec(node, reads)
    if moved is None or spec is None or len(spec) != len(new):
        raise Unresizable(f"'{node.name}' ({op_name(node)}) re-shapes the channels")
    counts = []
    for k, (value, count_class) in enumerate(spec):
        if k == moved and value != -1 and count_class is None:
            raise Unresizable(f"'{node.name}' ({op_name(node)}) gives the channel count as a fixed "
                              f"number ({new[k]}), which would not follow a new width")
        if k != moved and count_class is not None:
            raise Unresizable(f"'{node.name}' ({op_name(node)}) puts a channel count on dim {k}")
        if count_class is not None:
            counts.append(count_class)
    return moved, counts


def _reshape_spec(node: fx.Node, reads: dict) -> list[tuple] | None:
    """A reshape's target shape as (literal or None, class of the channel count it reads or None)
    per dim; None if some entry is neither a number nor a shape read."""
    spec = list(node.args[1:] if node.op == "call_method" else node.args[1:2])
    spec = spec or [node.kwargs.get("shape")]
    if len(spec) == 1 and isinstance(spec[0], (list, tuple)):
        spec = list(spec[0])
    read = [reads.get(v.name) if isinstance(v, fx.Node) else None for v in spec]
    if len(spec) == 1 and read[0] is not None and isinstance(read[0][0], tuple):
        holds, c = read[0]  # y.view(x.shape): every dim read from x
        return [(None, c if channel else None) for channel in holds]
    entries = []
    for value, size in zip(spec, read):
        if isinstance(value, int):
            entries.append((value, None))
        elif size is not None and isinstance(size[0], bool):
            entries.append((None, size[1] if size[0] else None))
        else:
            return None
    return entries


def _holds_channels(holds) -> bool:
    return any(holds) if isinstance(holds, tuple) else holds


def _shape_value(node: fx.Node, pos: dict[str, int], cls: dict[str, int],
                 reads: dict) -> tuple | None:
    """What a shape read, an index into one or arithmetic on sizes holds: (channels, class),
    `channels` saying whether the value is the channel count (a bool; a tuple of them for a
    whole shape), `class` whose count it is. None: the node is no size.

    A size of another dim stays what it was when the branch is rebuilt at other widths; the
    channel count follows the new width, so it may only re-shape the channels (see
    `_reshaped_position`), and arithmetic on it is refused."""
    if is_shape_read(node) and node.args[0].name in cls:
        source, dims = node.args[0], shape_read_dims(node)
        if dims is None:  # the rank
            return False, None
        holds = tuple(d == pos[source.name] for d in range(_rank(source)))
        if not isinstance(dims, (int, slice)):
            raise Unresizable(f"'{node.name}' ({op_name(node)}) reads a run-time dim")
        return holds[dims], cls[source.name]
    inputs = node.all_input_nodes
    if is_getitem(node) and inputs[0].name in reads:
        holds, c = reads[inputs[0].name]
        if not isinstance(holds, tuple) or not isinstance(node.args[1], (int, slice)):
            raise Unresizable(f"'{node.name}' indexes a size by a run-time value")
        return holds[node.args[1]], c
    if inputs and all(i.name in reads for i in inputs):  # arithmetic on sizes: h // 2
        if any(_holds_channels(reads[i.name][0]) for i in inputs):
            raise Unresizable(f"'{node.name}' ({op_name(node)}) computes with the channel count")
        return False, None
    return None


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
                   dim: int = 1, fixed_group_width: bool = True) -> BranchChannels:
    """Assign a channel class to every node of the branch `entry -> ... -> output`.

    Every node's channels sit at some dim of its shape (`pos`): `dim` at the entry, moved by
    permutes, kept by everything else. A layer must find them where it works (a Linear: last).
    A grouped layer keeps its group width (`fixed_group_width`: its groups follow its width, as
    in RegNet) or its number of groups (as in ResNeXt); see `plan.fixes_group_width`.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    cls: dict[str, int] = {entry: uf.make()}
    pos: dict[str, int] = {entry: dim}
    size: dict[int, int] = {cls[entry]: _channels(nodes[entry], dim)}
    divisors: dict[int, int] = {}
    reads: dict[str, tuple] = {}  # shape reads and sizes computed from them (`_shape_value`)
    group_widths: dict[str, tuple[int, int]] = {}

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
        value = _shape_value(node, pos, cls, reads)
        if value is not None:
            reads[name] = value
            continue
        inputs = [i for i in node.all_input_nodes if i.name in cls]
        if not inputs:
            raise Unresizable(f"'{name}' ({op_name(node)}) has no branch input")
        moved = _moved_position(node, modules, pos[inputs[0].name], inputs[0], reads)
        if moved is not None:  # a layout op: same channels, elsewhere
            pos[name], cls[name] = moved[0], cls[inputs[0].name]
            for count in moved[1]:
                cls[name] = join(cls[name], count, op_name(node))
            continue
        counted = next((i for i in node.all_input_nodes
                        if i.name in reads and _holds_channels(reads[i.name][0])), None)
        if counted is not None:
            raise Unresizable(f"'{name}' ({op_name(node)}) uses the channel count read by "
                              f"'{counted.name}', which a half-width branch would change")
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
                raise Unresizable(f"no resize rule for {type(module).__name__} ('{node.target}')"
                                  f"{reparametrized(module)}")
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
            groups = rule.groups(module)
            in_size = size[uf.find(cls[inputs[0].name])]
            keeps_width = groups > 1 and fixed_group_width and channels == in_size
            if rule.ties(module) or keeps_width:
                if channels != in_size:
                    raise Unresizable(f"'{node.target}' changes the channel count")
                cls[name] = cls[inputs[0].name]
            else:
                cls[name] = uf.make()
                size[cls[name]] = channels
            if keeps_width:  # its groups follow the width: the width a multiple of a group
                group_widths[name] = (cls[name], channels // groups)
                require(uf.find(cls[name]), channels // groups)
            else:
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
            raise Unresizable(f"op '{op_name(node)}' ('{name}') is not known to treat channels "
                              f"alike")
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
                          divisors=final_div, stream=uf.find(stream),
                          group_widths={n: (uf.find(c), width)
                                        for n, (c, width) in group_widths.items()})
