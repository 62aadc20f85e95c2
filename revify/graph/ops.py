"""What revify knows about individual graph ops: adds, activations, channel-agnostic functions.

Kept in one table-driven file so that teaching revify a new op is one line, not a new branch.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import fx, nn
from torchvision.ops.misc import Permute

try:
    from timm.layers import DropPath
except ImportError:  # timm is optional for revify's own code paths
    DropPath = nn.Identity

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}

# Elementwise activations that may follow a residual add (they then belong to the block).
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                      nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.PReLU, nn.Softplus, nn.SELU,
                      nn.CELU, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.RReLU)
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu,
                        F.hardswish, F.mish, torch.tanh, torch.sigmoid, F.hardtanh, F.sigmoid,
                        F.tanh, F.hardsigmoid, F.softplus, F.selu, F.celu, F.softsign,
                        F.logsigmoid, F.tanhshrink, F.softshrink, F.hardshrink, F.threshold,
                        F.rrelu}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}

# Functions and methods that treat every channel alike: running them at half width is valid.
# In-place functional forms (F.relu_) are left out: run on the coupled stream they would
# overwrite it, and only `inplace=` and `x.relu_()` are made out-of-place by the rewrite.
CHANNEL_AGNOSTIC_FUNCTIONS = ACTIVATION_FUNCTIONS | ADD_FUNCTIONS | {
    operator.sub, operator.mul, operator.truediv, operator.imul, operator.isub,
    operator.itruediv, operator.neg, operator.pow, torch.mul, torch.sub, torch.div, torch.neg,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.pow, torch.erf,
    torch.maximum, torch.minimum, torch.clamp, torch.clamp_min, torch.clamp_max,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.mean,
    torchvision.ops.stochastic_depth,  # drops whole samples: channels alike
}
CHANNEL_AGNOSTIC_METHODS = ACTIVATION_METHODS | ADD_METHODS | {
    "mul", "mul_", "sub", "sub_", "div", "div_", "neg", "exp", "abs", "sqrt", "rsqrt", "square",
    "pow", "mean", "clamp", "clamp_", "clamp_min", "clamp_max", "contiguous", "hardsigmoid",
    "expand_as",  # broadcasts a per-channel gate (SE's y.expand_as(x)): shapes align as in `*`
}

# Channel-agnostic ops that mix the trailing n dims (pooling): channels must sit before them.
SPATIAL_FUNCTIONS = {F.avg_pool1d: 1, F.max_pool1d: 1, F.adaptive_avg_pool1d: 1,
                     F.adaptive_max_pool1d: 1, F.avg_pool2d: 2, F.max_pool2d: 2,
                     F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.avg_pool3d: 3,
                     F.max_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3}

# Functions taking a `training` flag, and the module that computes the same while reading the
# flag from its own mode: traced once, `F.dropout(x, p, training=self.training)` would keep one
# mode's behaviour for good; as the module it follows `.train()` and `.eval()` as nn.Dropout does.
MODE_MODULES = {
    F.dropout: lambda a: nn.Dropout(a["p"], a["inplace"]),
    F.dropout1d: lambda a: nn.Dropout1d(a["p"], a["inplace"]),
    F.dropout2d: lambda a: nn.Dropout2d(a["p"], a["inplace"]),
    F.dropout3d: lambda a: nn.Dropout3d(a["p"], a["inplace"]),
    F.alpha_dropout: lambda a: nn.AlphaDropout(a["p"], a["inplace"]),
    F.feature_alpha_dropout: lambda a: nn.FeatureAlphaDropout(a["p"], a["inplace"]),
    F.rrelu: lambda a: nn.RReLU(a["lower"], a["upper"], a["inplace"]),
    torchvision.ops.stochastic_depth: lambda a: torchvision.ops.StochasticDepth(a["p"], a["mode"]),
}

# Shape reads: their result is a size, not a tensor. A size of a dim other than the channels
# does not change when the branch is rebuilt at other widths (`F.avg_pool2d(x, x.size(2))`).
SHAPE_METHODS = {"size", "dim"}
SHAPE_ATTRIBUTES = {"shape", "ndim"}
REDUCE_FUNCTIONS, REDUCE_METHODS = {torch.mean}, {"mean"}  # channels must not be reduced

# Layout ops: they move the channel axis (a permute) or re-shape a per-channel vector.
PERMUTE_FUNCTIONS, PERMUTE_METHODS = {torch.permute}, {"permute"}
TRANSPOSE_FUNCTIONS, TRANSPOSE_METHODS = ({torch.transpose, torch.swapaxes},
                                          {"transpose", "swapaxes"})
RESHAPE_FUNCTIONS, RESHAPE_METHODS = {torch.reshape}, {"reshape", "view"}

# Stateless modules that treat every element (or sample) alike wherever the channels sit; any
# other stateless module (pooling, flatten, channel shuffle) is trusted only channels-first.
POSITION_FREE_MODULES = ACTIVATION_MODULES + (nn.Identity, nn.Dropout, nn.AlphaDropout,
                                              torchvision.ops.StochasticDepth, DropPath)


# What a rerun must replay the RNG state for (revify.runtime.reversible and .checkpoint): layers
# that draw random numbers, and layers known to draw none. Any other module with a forward of
# its own (one revify does not know, a user's) is taken to draw some; so is a function from
# outside torch, torchvision, timm, revify and Python's own modules.
RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, nn.RReLU, torchvision.ops.StochasticDepth, DropPath)
DETERMINISTIC_MODULES = tuple(m for m in ACTIVATION_MODULES if m is not nn.RReLU) + (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm,
    nn.LayerNorm, nn.Identity, nn.Flatten, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, Permute,
    nn.Sequential, nn.ModuleList, nn.ModuleDict)  # containers: their children are looked at
RANDOM_FUNCTIONS = set(MODE_MODULES) | {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout,
    torch.rrelu, F.gumbel_softmax}
RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                  "geometric_", "cauchy_", "log_normal_", "multinomial"}
_KNOWN_FUNCTION_MODULES = ("torch", "_operator", "operator", "builtins", "math", "revify",
                           "torchvision", "timm")


def draws_random(module: nn.Module) -> bool:
    """Whether running `module` may draw random numbers (its rerun then replays the RNG state
    its forward drew from). Known once per module, instead of capturing the state every step."""
    for m in module.modules():
        if isinstance(m, fx.GraphModule):
            if any(map(_node_draws_random, m.graph.nodes)):
                return True
        elif isinstance(m, RANDOM_MODULES) or not (
                isinstance(m, DETERMINISTIC_MODULES) or type(m) is nn.Module  # a mere holder
                or getattr(m, "only_calls_children", False)):
            return True
    return False


def _node_draws_random(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in RANDOM_METHODS
    if node.op != "call_function":
        return False
    target = node.target  # a method descriptor (torch.Tensor.add) names its class's module
    origin = getattr(target, "__module__", None) or \
        getattr(getattr(target, "__objclass__", None), "__module__", "")
    return target in RANDOM_FUNCTIONS or origin.split(".")[0] not in _KNOWN_FUNCTION_MODULES


def is_add(node: fx.Node) -> bool:
    """A plain two-tensor add: `a + b`, `a += b`, `torch.add(a, b)`, `a.add(b)` (no alpha)."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ADD_METHODS:
        pass
    else:
        return False
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    return len(node.args) == 2 and len(tensors) == 2 and not node.kwargs


def is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ACTIVATION_METHODS


def is_channel_agnostic(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in CHANNEL_AGNOSTIC_FUNCTIONS
    return node.op == "call_method" and node.target in CHANNEL_AGNOSTIC_METHODS


def _is(node: fx.Node, functions, methods) -> bool:
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in methods)


def is_reshape(node: fx.Node) -> bool:
    return _is(node, RESHAPE_FUNCTIONS, RESHAPE_METHODS)


def is_reduction(node: fx.Node) -> bool:
    return _is(node, REDUCE_FUNCTIONS, REDUCE_METHODS)


def mode_arguments(node: fx.Node) -> dict | None:
    """The arguments (defaults filled in) of a call to a function of MODE_MODULES, else None."""
    if node.op != "call_function" or node.target not in MODE_MODULES:
        return None
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def mode_module(node: fx.Node) -> tuple[nn.Module, fx.Node] | None:
    """The module computing `node` that reads `training` from its own mode, and its input;
    None if `node` is no such call or an argument besides the input is computed at run time."""
    args = mode_arguments(node)
    if args is None or not isinstance(args["input"], fx.Node):
        return None
    settings = {k: v for k, v in args.items() if k not in ("input", "training")}
    if any(isinstance(v, fx.Node) for v in settings.values()):
        return None
    return MODE_MODULES[node.target](settings), args["input"]


def is_shape_read(node: fx.Node) -> bool:
    """`x.size()`, `x.size(d)`, `x.shape`, `x.dim()`, `x.ndim`: a read of the shape, not the
    values."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and \
        len(node.args) == 2 and node.args[1] in SHAPE_ATTRIBUTES


def shape_read_dims(node: fx.Node) -> int | slice | None:
    """Which dims of its tensor a shape read returns: one dim (`x.size(2)`), a slice of them
    (`x.size()`, `x.shape`: all), or None (`x.dim()`: the rank, no dim's size)."""
    if (node.op, node.target) == ("call_method", "dim") or node.args[1:] == ("ndim",):
        return None
    dim = node.args[1] if node.op == "call_method" and len(node.args) > 1 else \
        node.kwargs.get("dim") if node.op == "call_method" else None
    return slice(None) if dim is None else dim


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def spatial_dims(node: fx.Node) -> int:
    """How many trailing dims a channel-agnostic op mixes (pooling), else 0."""
    return SPATIAL_FUNCTIONS.get(node.target, 0) if node.op == "call_function" else 0


def permute_dims(node: fx.Node, modules: dict[str, nn.Module]) -> list[int] | None:
    """The dims of a permute (`x.permute(0, 2, 3, 1)`, `torch.permute`, torchvision's `Permute`,
    a transpose)."""
    if _is(node, PERMUTE_FUNCTIONS, PERMUTE_METHODS):
        dims = node.args[1:] or (node.kwargs.get("dims"),)
    elif node.op == "call_module" and isinstance(modules[node.target], Permute):
        dims = (modules[node.target].dims,)
    elif _is(node, TRANSPOSE_FUNCTIONS, TRANSPOSE_METHODS):
        return _transpose_dims(node)
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return list(dims) if all(isinstance(d, int) for d in dims) else None


def _transpose_dims(node: fx.Node) -> list[int] | None:
    """`x.transpose(a, b)` / `torch.transpose(x, a, b)` as permute dims (needs the rank)."""
    a, b = (list(node.args[1:3]) + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
    rank = len(node.meta.get("shape") or ())
    if not (isinstance(a, int) and isinstance(b, int) and rank):
        return None
    dims = list(range(rank))
    dims[a % rank], dims[b % rank] = dims[b % rank], dims[a % rank]
    return dims


def op_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))
