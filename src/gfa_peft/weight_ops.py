"""How each supported layer type uses its weight, seen in the orientation GFA lays out.

GFA flattens every update in the (out_features, in_features, ...) orientation, so layouts are
comparable across architectures: transformers' `Conv1D` stores its weight as (in, out) and is
seen through a transposed view. Each op gives the three products the scatter function needs:
the forward with a given weight, the gradient for the input and the gradient for the weight.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class WeightOp:
    """A layer's weight-dependent computation, bias excluded (the layer adds its own bias).

    `fusable` says whether the update can be added to the weight inside the layer's op. A
    quantized weight cannot: the layer then runs its own forward and the update's product is added.
    """

    fusable = True

    def __init__(self, layer: nn.Module):
        self.layer = layer

    @property
    def shape(self) -> tuple[int, ...]:
        """The update's shape in GFA's orientation."""
        return tuple(self.weight().shape)

    @property
    def features(self) -> tuple[int, int]:
        """(in_features, out_features) as PEFT's LoRA layers report them for this layer type."""
        out_features, in_features = self.shape[:2]
        return in_features, out_features

    def weight(self) -> torch.Tensor:
        """The layer's weight in GFA's orientation; a view that shares the layer's storage."""
        return self.layer.weight

    def stored(self, update: torch.Tensor) -> torch.Tensor:
        """An update in GFA's orientation, seen in the layer's own weight layout."""
        return update

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_input(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_weight(self, grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the gradient of the weight (in GFA's orientation) into `out` and return it."""
        raise NotImplementedError

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.layer, "bias", None)
        return out if bias is None else out + bias


class LinearOp(WeightOp):
    def forward(self, x, weight):
        return F.linear(x, weight)

    def grad_input(self, grad_out, x, weight):
        return grad_out @ weight

    def grad_weight(self, grad_out, x, out):
        return torch.mm(grad_out.reshape(-1, grad_out.shape[-1]).T, x.reshape(-1, x.shape[-1]), out=out)


class Conv1DOp(LinearOp):
    """transformers' GPT-2 `Conv1D`: y = x W + b with W stored as (in, out)."""

    def weight(self):
        return self.layer.weight.T

    def stored(self, update):
        return update.T


class QuantizedLinearOp(LinearOp):
    """A bitsandbytes 8-bit (`Linear8bitLt`) or 4-bit (`Linear4bit`) linear layer, QLoRA-style: the frozen
    weight stays quantized and runs through the layer's own kernels; only the update is in float."""

    fusable = False

    @property
    def shape(self):
        return (self.layer.out_features, self.layer.in_features)

    def weight(self):
        """A dequantized copy (not a view): writing to it does not change the layer."""
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(self.layer.weight, getattr(self.layer, "state", None))


class Conv2dOp(WeightOp):
    def __init__(self, layer: nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise TypeError(f"GFA supports Conv2d with padding_mode='zeros' only, got {layer.padding_mode!r}")
        super().__init__(layer)
        self.hyper = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)

    @property
    def features(self):
        return self.layer.in_channels, self.layer.out_channels

    def forward(self, x, weight):
        return F.conv2d(x, weight, None, **self.hyper)

    def grad_input(self, grad_out, x, weight):
        return torch.nn.grad.conv2d_input(x.shape, weight, grad_out, **self.hyper)

    def grad_weight(self, grad_out, x, out):
        return out.copy_(torch.nn.grad.conv2d_weight(x, self.layer.weight.shape, grad_out, **self.hyper))

    def add_bias(self, out):
        bias = self.layer.bias
        return out if bias is None else out + bias.view(1, -1, 1, 1)


class EmbeddingOp(WeightOp):
    def __init__(self, layer: nn.Embedding):
        if layer.max_norm is not None or layer.sparse:
            raise TypeError("GFA supports nn.Embedding without max_norm and with dense gradients only")
        super().__init__(layer)

    @property
    def features(self):
        return self.layer.num_embeddings, self.layer.embedding_dim

    def forward(self, x, weight):
        return F.embedding(
            x, weight, self.layer.padding_idx, scale_grad_by_freq=self.layer.scale_grad_by_freq
        )

    def grad_weight(self, grad_out, x, out):
        padding_idx = -1 if self.layer.padding_idx is None else self.layer.padding_idx
        return out.copy_(
            torch.ops.aten.embedding_dense_backward(
                grad_out, x, self.layer.num_embeddings, padding_idx, self.layer.scale_grad_by_freq
            )
        )


OPS: dict[type, type[WeightOp]] = {
    nn.Linear: LinearOp,
    Conv1D: Conv1DOp,
    nn.Conv2d: Conv2dOp,
    nn.Embedding: EmbeddingOp,
}


def quantized_ops() -> dict[type, type[WeightOp]]:
    """bitsandbytes' quantized linear layers, when bitsandbytes is loaded (a model holding its
    layers has imported it; it is an optional dependency)."""
    if "bitsandbytes" not in sys.modules:
        return {}
    bnb = sys.modules["bitsandbytes"]
    return {bnb.nn.Linear8bitLt: QuantizedLinearOp, bnb.nn.Linear4bit: QuantizedLinearOp}


def op_for(layer: nn.Module, name: str = "") -> WeightOp:
    """The op of a supported layer; a `TypeError` naming the module and its type otherwise.

    The most specific registered class wins (bitsandbytes' layers are `nn.Linear` subclasses)."""
    ops = {**OPS, **quantized_ops()}
    for layer_type in type(layer).__mro__:
        if layer_type in ops:
            return ops[layer_type](layer)
    supported = ", ".join(t.__name__ for t in ops)
    raise TypeError(
        f"GFA cannot adapt module {name or layer.__class__.__name__!r} of type "
        f"{type(layer).__module__}.{type(layer).__qualname__}; supported types: {supported}"
    )


def update_shape(layer: nn.Module, name: str = "") -> tuple[int, ...]:
    """The shape of this layer's update in GFA's orientation, e.g. (out, in) for a linear map."""
    return op_for(layer, name).shape
