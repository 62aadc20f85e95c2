"""What revify knows about individual graph ops: adds, activations, channel-agnostic functions.

Kept in one table-driven file so that teaching revify a new op is one line, not a new branch.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}

# Elementwise activations that may follow a residual add (they then belong to the block).
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                      nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.PReLU)
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu,
                        F.hardswish, F.mish, torch.tanh, torch.sigmoid, F.hardtanh}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}

# Functions and methods that treat every channel alike: running them at half width is valid.
CHANNEL_AGNOSTIC_FUNCTIONS = ACTIVATION_FUNCTIONS | ADD_FUNCTIONS | {
    operator.sub, operator.mul, operator.truediv, operator.imul, torch.mul, torch.sub,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.hardsigmoid, F.sigmoid,
    torch.mean, torch.clamp,
}
CHANNEL_AGNOSTIC_METHODS = ACTIVATION_METHODS | ADD_METHODS | {
    "mul", "mul_", "sub", "div", "mean", "clamp", "clamp_", "contiguous", "sigmoid",
    "hardsigmoid",
}


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


def op_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))
