"""Step 4 of the pipeline: execute a plan on the traced graph.

Each reversible stage's nodes are replaced by one `ReversibleStage` call whose couplings are the
blocks' branches rebuilt at half width; each checkpointed segment is outlined into its own
GraphModule and wrapped in `Checkpointed`.
"""
from __future__ import annotations

import operator
import torch
from torch import fx, nn

from revify.graph.blocks import module_path
from revify.runtime.checkpoint import Checkpointed
from revify.runtime.fast import call_directly
from revify.runtime.keep import Kept
from revify.plan.lean import LeanPlan, apply_lean
from revify.runtime.modes import UnitMode, UnitSchedule, graphs_in
from revify.plan.plan import BlockPlan, Plan, SegmentPlan, StagePlan
from revify.graph.channels import groups_key, inner_key
from revify.plan.resize import carry_over, rebuild
from revify.runtime.reversible import CouplingBlock, ReversibleStage


def _unit_name(gm: fx.GraphModule, label: str) -> str:
    """A temporary attribute name; `_finalize` gives units their readable names."""
    name = f"_revify_unit{len(gm.meta.setdefault('revify_units', {}))}"
    gm.meta["revify_units"][name] = label
    return name


def _readable(label: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() else "_" for c in label).strip("_") or "unit"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule holding only what the rewritten graph uses, units named by label."""
    labels = gm.meta.get("revify_units", {})
    taken = {n.target.split(".")[0] for n in gm.graph.nodes
             if n.op in ("call_module", "get_attr") and n.target not in labels}
    owners = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        owner = operator.attrgetter(node.target)(gm)
        if node.target in labels:
            node.target = _readable(labels[node.target], taken)
            node._rename(node.target)
        owners[node.target] = owner
    return fx.GraphModule(owners, gm.graph, class_name=type(gm).__name__)


def _out_of_place(node: fx.Node, module: nn.Module | None) -> None:
    """Make an op that reads the branch input non-mutating: that input is the coupled stream."""
    if module is not None and getattr(module, "inplace", False):
        module.inplace = False
    if node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        node.target = node.target[:-1]


def _protect(gm: fx.GraphModule, value: fx.Node) -> None:
    """Make every op that reads `value` non-mutating: a checkpoint or reversible stage stores it."""
    for user in value.users:
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        _out_of_place(user, module)


def _local_name(target: str, prefix: str) -> str:
    local = target[len(prefix) + 1:] if target.startswith(prefix + ".") else target
    return local.replace(".", "_")


def build_branch(gm: fx.GraphModule, bp: BlockPlan, stream_offset: int) -> fx.GraphModule:
    """The block's branch as a standalone module at the plan's channel counts.

    `stream_offset` picks which half of the original's stream channels the copied weights come
    from: 0 for F, C/2 for G.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    block = bp.block
    graph, root = fx.Graph(), nn.Module()
    env: dict[str, fx.Node] = {}
    built: dict[str, str] = {}   # original target -> local name (shared modules built once)
    carried = 0                  # values that start from the original's weights

    def copy_module(node: fx.Node, local: str, source: str) -> str:
        """Build the resized copy of a call_module node's module; `source` is its input node."""
        nonlocal carried
        if node.target not in built:
            module = gm.get_submodule(node.target)
            new = rebuild(module, bp.channels[source], bp.channels[node.name],
                          inner=bp.channels.get(inner_key(node.name)),
                          groups=bp.channels.get(groups_key(node.name)))
            carried += carry_over(new, module, stream_offset if source in bp.stream else 0,
                       stream_offset if node.name in bp.stream else 0)
            root.add_module(local, new)
            built[node.target] = local
        return built[node.target]

    def copy_vector(node: fx.Node) -> str:
        """A bare per-channel parameter or buffer (layer scale) at its new channel count.

        Like `carry_over`: the original's slice from the stream offset; values past the
        original's end (a wider internal class) repeat it from the start.
        """
        nonlocal carried
        if node.target not in built:
            module, _, attr = node.target.rpartition(".")
            old = getattr(gm.get_submodule(module), attr)
            axis = next(d for d, n in enumerate(old.shape) if n != 1)
            offset = stream_offset if node.name in bp.stream else 0
            n, total = bp.channels[node.name], old.shape[axis]
            index = (offset + torch.arange(n, device=old.device)) % total
            new = old.detach().index_select(axis, index)
            carried += min(n, total - offset) if new.is_floating_point() else 0
            local = _local_name(node.target, module_path(bp.name))
            if isinstance(old, nn.Parameter):
                root.register_parameter(local, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                root.register_buffer(local, new)
            built[node.target] = local
        return built[node.target]

    x = graph.placeholder("x")
    env[block.entry] = x
    if bp.pre_op:  # the previous block's post-add activation, moved into the branch
        pre = nodes[bp.pre_op]
        new = graph.node_copy(pre, lambda n: x)
        if pre.op == "call_module":
            new.target = copy_module(pre, "pre_act", bp.pre_op)
        _out_of_place(new, root.get_submodule(new.target) if pre.op == "call_module" else None)
        env[block.entry] = new
    for name in block.branch:
        node = nodes[name]
        new = graph.node_copy(node, lambda n: env[n.name])
        if node.op == "call_module":
            new.target = copy_module(node, _local_name(node.target, module_path(bp.name)),
                                     node.all_input_nodes[0].name)
        elif node.op == "get_attr":
            new.target = copy_vector(node)
        if env[block.entry] in new.all_input_nodes:
            _out_of_place(new, root.get_submodule(new.target) if node.op == "call_module" else None)
        env[name] = new
    graph.output(env[block.branch_output])
    branch = fx.GraphModule(root, graph, class_name="Branch")
    branch.meta["carried_values"] = carried  # for the weights report of `revify convert`
    return branch


def _lean_branch(gm: fx.GraphModule, bp: BlockPlan, stream_offset: int) -> fx.GraphModule:
    branch = build_branch(gm, bp, stream_offset)
    if bp.lean:
        apply_lean(branch, bp.lean, _nest, _wrap)
    return branch


def _replace_stage(gm: fx.GraphModule, plan: Plan, stage: StagePlan) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    block_plans = [plan.block(name) for name in stage.blocks]
    half = stage.channels // 2
    couplings = [CouplingBlock(_lean_branch(gm, plan.block(f), 0),
                               _lean_branch(gm, plan.block(g), half) if g else None)
                 for f, g in stage.couplings]
    module = ReversibleStage(couplings, stage.dim, plan.options.reconstruction == "exact",
                             stage.anchor_every, stage.channels)
    _check_shape(module, nodes[stage.entry].meta["shape"], stage.name)
    attr = _unit_name(gm, stage.name)
    gm.add_submodule(attr, module)
    output = nodes[stage.output]
    with gm.graph.inserting_before(output):
        call = gm.graph.call_module(attr, (nodes[stage.entry],))
    output.replace_all_uses_with(call)
    _protect(gm, call)  # the stage saves its output for the backward
    exit_op = block_plans[-1].block.post_op
    inner = [nodes[n] for bp in block_plans for n in bp.block.nodes if n != exit_op]
    for node in reversed(inner):
        gm.graph.erase_node(node)


def _check_shape(stage: ReversibleStage, shape: tuple[int, ...], name: str) -> None:
    """Run the built stage once on the meta device: it must map its input shape to itself.

    A safety net behind the plan's channel analysis: a wrongly rebuilt branch fails here, at
    transform time, instead of producing a model that breaks (or silently differs) later.
    """
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*stage.named_parameters(), *stage.named_buffers()]}
    try:
        with torch.no_grad():
            out = torch.func.functional_call(stage, meta, (torch.empty(shape, device="meta"),))
        ok, detail = tuple(out.shape) == tuple(shape), f"output shape {tuple(out.shape)}"
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not ok:
        raise RuntimeError(f"revify built reversible stage {name} wrongly ({detail} for input "
                           f"{tuple(shape)}); please report this model.")


def _outline(gm: fx.GraphModule, names: list[str], label: str, wrap, lean: LeanPlan | None = None,
             attr: str | None = None) -> None:
    """Move a contiguous run of nodes into a submodule and call it (wrapped) in their place;
    `lean` is what its recompute does differently (its nested layers are outlined likewise)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    members = [nodes[n] for n in names]
    inside = set(members)
    inputs = list(dict.fromkeys(i for n in members for i in n.all_input_nodes if i not in inside))
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {i: sub.placeholder(i.name) for i in inputs}
    for n in members:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    module = fx.GraphModule(gm, sub, class_name="Segment")
    for i in inputs:  # checkpointing stores the inputs: nothing inside may overwrite them
        _protect(module, env[i])
    module.recompile()
    if lean:
        apply_lean(module, lean, _nest, _wrap)
    attr = attr or _unit_name(gm, label)
    gm.add_submodule(attr, wrap(module))
    with gm.graph.inserting_after(members[-1]):
        call = gm.graph.call_module(attr, tuple(inputs))
    if len(outputs) == 1:
        outputs[0].replace_all_uses_with(call)
    else:
        with gm.graph.inserting_after(call):
            for k, o in enumerate(outputs):
                o.replace_all_uses_with(gm.graph.call_function(operator.getitem, (call, k)))
    for node in reversed(members):
        gm.graph.erase_node(node)


def _nest(gm: fx.GraphModule, names: list[str], label: str, lean: LeanPlan | None = None) -> None:
    """A layer of a unit checkpointed once more inside it (see revify.plan.lean); its modules stay
    registered in the unit, under the names they had."""
    taken = {name for name, _ in gm.named_children()}
    _outline(gm, names, label, lambda region: Checkpointed(region, owned=False), lean,
             attr=_readable(label, taken))


def _wrap(gm: fx.GraphModule, node: fx.Node, wrapper) -> None:
    """A layer of a unit called through a wrapper (revify.runtime.keep's Kept); the layer stays
    registered in the unit, under the name it had."""
    taken = {name for name, _ in gm.named_children()}
    module = wrapper(gm.get_submodule(node.target))
    node.target = _readable(f"{node.target}_{type(module).__name__.lower()}", taken)
    gm.add_submodule(node.target, module)


def rewrite(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Execute `plan` on `gm` (whose graph is consumed) and return the rewritten module."""
    for stage in plan.stages:
        _replace_stage(gm, plan, stage)
    for segment in plan.segments:
        if segment.outlined and segment.kind != "stage":
            _outline(gm, segment.nodes, segment.name, Checkpointed, segment.lean)
    gm.graph.lint()
    net = _finalize(gm)
    _call_layers_directly(net)
    return net


def _call_layers_directly(net: fx.GraphModule) -> None:
    """Every graph of `net` (nested checkpoints' too, which are not registered) calls its
    convolutions, BatchNorms and ReLUs through revify.runtime.fast."""
    for gm in graphs_in(net):
        call_directly(gm)


def unit_calls(net: fx.GraphModule) -> list[fx.Node]:
    """The nodes of `net` that call a unit (a Checkpointed or ReversibleStage), in order."""
    return [n for n in net.graph.nodes if n.op == "call_module"
            and isinstance(net.get_submodule(n.target), (Checkpointed, ReversibleStage))]


def unit_nodes(net: fx.GraphModule, plan: Plan) -> list[tuple[SegmentPlan, fx.Node]] | None:
    """Each outlined segment of `plan` with the node of `net` that calls its unit, in order;
    None if they do not pair up."""
    nodes = unit_calls(net)
    outlined = [s for s in plan.segments if s.outlined]
    return list(zip(outlined, nodes)) if len(nodes) == len(outlined) else None


def nested(unit: nn.Module) -> list[Checkpointed]:
    """The layers checkpointed inside a unit (revify.plan.lean's nesting)."""
    return [m for m in unit.modules() if isinstance(m, Checkpointed) and m is not unit]


def kept(unit: nn.Module) -> list[Kept]:
    """The layers whose outputs a unit's forward may keep (revify.runtime.keep)."""
    return [m for m in unit.modules() if isinstance(m, Kept)]


def set_mode(unit: nn.Module, schedule: UnitSchedule) -> None:
    """Run a unit as `schedule` says. What is checkpointed inside it (revify.plan.lean's nesting)
    stores unless the unit runs LEAN, and keeps nothing; each kept layer learns whether the
    unit keeps it."""
    inner = UnitSchedule() if schedule.mode is UnitMode.LEAN else UnitSchedule(UnitMode.STORED)
    for module in unit.modules():
        if isinstance(module, (Checkpointed, ReversibleStage)):
            module.schedule = schedule if module is unit else inner
    for layer in kept(unit):
        layer.keeps = layer.layer_name in schedule.kept


def apply_schedule(net: fx.GraphModule, plan: Plan) -> None:
    """Run every unit of `net` (rewritten from `plan`) as `plan.schedule` says."""
    for segment, node in unit_nodes(net, plan) or []:
        set_mode(net.get_submodule(node.target), plan.schedule.units[segment.name])
