"""Step 2 of the pipeline: find residual blocks on an fx graph.

A residual block is an add `x + branch(x)` where everything on both sides of the add is computed
from one tensor `x` (the block's entry) and feeds nothing but the add. An elementwise activation
that is the add's only user belongs to the block (post-activation ResNets). A shortcut side that
does anything to `x` (projection conv, pooling, padding) makes the block a *projection* block:
found and reported, but not invertible. Something on one side must be learned (a layer with
parameters or buffers): `max_pool(x) + avg_pool(x)` is arithmetic, not a block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import fx, nn

from revify.graph.ops import is_activation, is_add
from revify.plan.resize import holds_state

# A branch deeper than this many nodes is not treated as one block (keeps the search linear).
MAX_BLOCK_NODES = 400


@dataclass(frozen=True)
class ResidualBlock:
    name: str                   # module path shared by the block's layers, e.g. "layer1.1"
    entry: str                  # node name of x
    add: str                    # node name of the add
    output: str                 # node name of the block output (post-activation or the add)
    branch: tuple[str, ...]     # nodes of the residual branch, in graph order, x excluded
    branch_output: str          # the branch's last node (the add's other operand)
    shortcut: tuple[str, ...]   # nodes on the shortcut side, x excluded
    identity_shortcut: bool     # the shortcut passes x through unchanged (nothing or nn.Identity)
    post_op: str | None         # activation after the add, if any
    nodes: tuple[str, ...]      # every node the block owns, in graph order


def _block_entry(add: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, set[fx.Node]] | None:
    """Walk back from the add until every path meets in one node: the block's entry.

    Returns (entry, region) where region holds the nodes strictly between entry and the add.
    """
    frontier = set(add.all_input_nodes)
    region: set[fx.Node] = set()
    while len(frontier) > 1:
        latest = max(frontier, key=order.__getitem__)
        if latest.op == "placeholder" or len(region) > MAX_BLOCK_NODES:
            return None
        frontier.remove(latest)
        region.add(latest)
        for inp in latest.all_input_nodes:
            (region if inp.op == "get_attr" else frontier).add(inp)
    (entry,) = frontier
    return entry, region


def _ancestors_within(node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in region and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _reads(side: set[fx.Node], entry: fx.Node) -> bool:
    return any(entry in n.all_input_nodes for n in side)


def _learned(nodes: set[fx.Node], modules: dict[str, nn.Module]) -> bool:
    """Whether any of `nodes` reads a parameter or a buffer (a layer, or a weight fetched by
    get_attr): what a residual function has and an arithmetic of pools does not."""
    return any(n.op == "get_attr" or (n.op == "call_module" and holds_state(modules[n.target]))
               for n in nodes)


def _is_identity_module(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], nn.Identity)


def _common_module_path(nodes, fallback: str) -> str:
    """The module path all of a block's layers share ("layer1.1"), else the add's node name."""
    paths = {n.target for n in nodes if n.op == "call_module"}
    if not paths:
        return fallback
    prefix = []
    for level in zip(*(p.split(".") for p in paths)):
        if len(set(level)) > 1:
            break
        prefix.append(level[0])
    if len(paths) == 1:
        prefix = prefix[:-1]  # a one-layer branch: name the block by its parent
    return ".".join(prefix) or fallback


def _match_block(add: fx.Node, order, modules) -> ResidualBlock | None:
    found = _block_entry(add, order)
    if found is None:
        return None
    entry, region = found
    a, b = add.args
    # Nothing inside the block may be used outside it (such a tap would need the block's insides).
    allowed = region | {add}
    if any(u not in allowed for n in region if n.op != "get_attr" for u in n.users):
        return None
    side_a, side_b = _ancestors_within(a, region), _ancestors_within(b, region)
    if side_a & side_b:
        return None  # both sides share computation: not a branch + shortcut
    # The branch is the side with more layers; an identity shortcut has none (or only Identity).
    if len(side_b) > len(side_a):
        a, b, side_a, side_b = b, a, side_b, side_a
    if b is not entry and not side_b:
        return None
    if a is entry or not side_a:
        return None
    if not all(_reads(side, entry) for side in (side_a, side_b) if side):
        return None  # a side that does not start from x (x + pos_embed): not a residual
    if not _learned(region, modules):
        return None  # nothing learned on either side (max_pool(x) + avg_pool(x)): a plain op
    post = next(iter(add.users)) if len(add.users) == 1 else None
    if post is not None and not (is_activation(post, modules) and post.all_input_nodes == [add]):
        post = None
    branch = sorted(side_a | {n for n in region if n.op == "get_attr" and n not in side_b},
                    key=order.__getitem__)
    owned = sorted(region, key=order.__getitem__) + [add] + ([post] if post is not None else [])
    return ResidualBlock(
        name=_common_module_path(branch, add.name), entry=entry.name, add=add.name,
        output=(post or add).name, branch=tuple(n.name for n in branch), branch_output=a.name,
        shortcut=tuple(n.name for n in sorted(side_b, key=order.__getitem__)),
        identity_shortcut=all(_is_identity_module(n, modules) for n in side_b),
        post_op=post.name if post is not None else None,
        nodes=tuple(n.name for n in owned),
    )


def find_blocks(gm: fx.GraphModule) -> list[ResidualBlock]:
    """Every residual block of the graph, in graph order; nested blocks keep only the innermost."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules = dict(gm.named_modules())
    blocks: list[ResidualBlock] = []
    owned: set[str] = set()
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        block = _match_block(node, order, modules)
        if block is None:
            continue
        inner = owned & set(block.branch + block.shortcut)
        if inner:
            continue  # an outer residual around inner blocks: the inner blocks are the units
        blocks.append(block)
        owned.update(block.nodes)
    return _unique_names(blocks)


def module_path(block_name: str) -> str:
    """The module a block belongs to ("blocks.0" for both "blocks.0" and "blocks.0#2")."""
    return block_name.split("#")[0]


def _unique_names(blocks: list[ResidualBlock]) -> list[ResidualBlock]:
    """Blocks are referred to by name; a module path reused by two blocks gets a suffix."""
    seen: dict[str, int] = {}
    unique = []
    for block in blocks:
        seen[block.name] = seen.get(block.name, 0) + 1
        unique.append(block if seen[block.name] == 1 else
                      dataclasses.replace(block, name=f"{block.name}#{seen[block.name]}"))
    return unique
