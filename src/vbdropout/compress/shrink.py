"""Physically remove pruned neurons and channels from a network.

:func:`shrink` turns a trained sequential model into a smaller plain
``nn.Sequential`` that computes the same function as ``model.eval()`` (up to
float rounding):

1. :func:`~vbdropout.nn.deterministic.to_deterministic` — plain layers,
   pruned weights zeroed, unit-noise layers as fixed scales;
2. :func:`fold_scales` — every scale is multiplied into the weight layer it
   touches (a scale on a convolution's output into that convolution's rows and
   bias, a scale on a linear layer's input into its columns);
3. between two consecutive weight layers A → (ReLU | MaxPool2d | AdaptiveAvgPool2d |
   Flatten)* → B,
   a unit of A is removed when B never reads it (its columns in B are zero),
   or when A never writes it (its row in A is zero): then the unit outputs the
   constant f(bias), which is folded into B's bias exactly (B linear, or B a
   convolution without padding; with padding only a zero constant is removed);
4. features that a linear layer after a Flatten never reads (input pixels, or
   single positions of a convolution's kept channels) are dropped by an
   :class:`~vbdropout.nn.deterministic.InputSelect` in the Flatten's place.

Step 3 repeats until nothing changes, then step 4 runs once. Every function here takes the
pruning thresholds of :func:`~vbdropout.nn.deterministic.to_deterministic`
(``log_alpha_threshold``, ``unit_threshold``: ``"own"``, a log α, or ``None``)
and leaves the model unchanged. Supported: ``Sequential`` networks of
Linear, Conv2d (groups = 1), ReLU, MaxPool2d, AdaptiveAvgPool2d, Flatten,
Dropout/Identity — the shape of every network in :mod:`vbdropout.models`.

Any other model (a user's network after :func:`vbdropout.convert`, or a
``Sequential`` with layers outside that list) is made
deterministic and every ``nn.Sequential`` inside it that the rules above
support is replaced by its shrunk version; such a part keeps its input and
output shapes, so the model's own ``forward`` still runs. The rest stays as the
deterministic layers (pruned weights zero); :func:`shrink_with_parts` also
names the parts it replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor, nn

from ..nn.deterministic import InputSelect, Scale, to_deterministic
from ..nn.geometry import is_plain_conv
from ..nn.prunable import Threshold

__all__ = [
    "fold_scales",
    "fold_scales_with_parts",
    "neurons_per_layer",
    "shrink",
    "shrink_with_parts",
]

_WEIGHT = (nn.Linear, nn.Conv2d)
_BETWEEN = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_SUPPORTED = (*_WEIGHT, *_BETWEEN, Scale, InputSelect)


def _flat_layers(module: nn.Module) -> list[nn.Module]:
    if type(module) is nn.Sequential:
        return [m for child in module for m in _flat_layers(child)]
    if type(module) in (nn.Identity, nn.Dropout):
        return []
    return [module]


def _unsupported(reason: str) -> ValueError:
    return ValueError(f"shrink cannot handle this sequential network: {reason}")


def _check_supported(layers: list[nn.Module]) -> None:
    """Raise unless ``layers`` is a chain that the shrink rules read correctly.

    Types must match exactly (a subclass may have its own ``forward``), every
    weight layer must read what the previous one wrote, and convolutions must
    use zero padding given as numbers.
    """
    units: int | None = None  # outputs of the last weight layer
    state = "start"  # then "image" (after a conv), "flattened" (its Flatten), "flat" (Linear)
    for m in layers:
        kind = type(m)
        if kind not in _SUPPORTED:
            raise _unsupported(
                "it supports exactly Linear, Conv2d, ReLU, MaxPool2d, AdaptiveAvgPool2d and "
                f"Flatten layers (and vbdropout's noise layers), found {kind.__name__}"
            )
        if kind is nn.Conv2d:
            if not is_plain_conv(m):
                raise _unsupported(
                    "grouped convolutions, padding given as a string and padding modes "
                    "other than zeros are not supported"
                )
            if state not in ("start", "image") or (units is not None and m.in_channels != units):
                raise _unsupported(f"{m} does not read the previous layer's channels")
            units, state = m.out_channels, "image"
        elif kind is nn.Linear:
            fits = (
                state == "start"
                or (state == "flattened" and m.in_features % units == 0)
                or (state == "flat" and m.in_features == units)
            )
            if not fits:
                raise _unsupported(f"{m} does not read the previous layer's outputs")
            units, state = m.out_features, "flat"
        elif kind is nn.Flatten:
            if (m.start_dim, m.end_dim) != (1, -1):
                raise _unsupported("Flatten must flatten all but the batch dimension")
            state = "flattened" if state == "image" else state


def _fold_sequential(model: nn.Module) -> nn.Sequential:
    layers = _flat_layers(to_deterministic(model))
    _check_supported(layers)
    out: list[nn.Module] = []
    pending: Tensor | None = None  # a scale waiting for the next linear layer's input
    for layer in layers:
        if isinstance(layer, Scale):
            if out and isinstance(out[-1], _WEIGHT):  # directly after: scale its outputs
                previous = out[-1]
                if previous.weight.shape[0] != layer.scale.numel():
                    raise _unsupported(f"a unit-noise layer does not match {previous}")
                previous.weight.mul_(layer.scale.view(-1, *[1] * (previous.weight.dim() - 1)))
                if previous.bias is not None:
                    previous.bias.mul_(layer.scale)
            elif pending is None:
                pending = layer.scale
            else:
                raise ValueError("two unit-noise layers in a row cannot be folded")
            continue
        if pending is not None:
            if isinstance(layer, nn.Flatten):
                out.append(layer)
                continue
            if not isinstance(layer, nn.Linear) or layer.in_features != pending.numel():
                raise ValueError(
                    f"a unit-noise layer must feed a linear layer, not {type(layer).__name__}"
                )
            layer.weight.mul_(pending.view(1, -1))
            pending = None
        out.append(layer)
    if pending is not None:
        raise ValueError("a unit-noise layer at the end of the network cannot be folded")
    return nn.Sequential(*out).eval()


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _column_groups(b: nn.Module, units: int) -> Tensor:
    """B's weights grouped by the A-unit they read: shape (units, B.out, per-unit)."""
    w = b.weight
    if isinstance(b, nn.Linear):
        per = b.in_features // units
        return w.view(w.shape[0], units, per).transpose(0, 1)
    return w.transpose(0, 1).reshape(units, w.shape[0], -1)


def _rebuild(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    else:
        new = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias is not None,
            padding_mode=layer.padding_mode,
        )
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new.eval()


def _prune_pair(layers: list[nn.Module], ai: int, bi: int) -> bool:
    """Remove the units of layers[ai] that layers[bi] ignores or that are constant."""
    a, b = layers[ai], layers[bi]
    units = _units(a)
    groups = _column_groups(b, units)  # (units, out_b, per)
    unread = (groups == 0).flatten(1).all(1)
    unwritten = (a.weight == 0).flatten(1).all(1)
    constant = a.bias.clone() if a.bias is not None else a.weight.new_zeros(units)
    if any(isinstance(m, nn.ReLU) for m in layers[ai + 1 : bi]):
        constant = constant.clamp_min(0)
    foldable = b.bias is not None and (isinstance(b, nn.Linear) or all(p == 0 for p in b.padding))
    removable_constant = unwritten & ((constant == 0) | foldable)
    remove = unread | removable_constant
    if not remove.any():
        return False
    if remove.all():  # keep one unit so that every layer keeps a valid shape
        remove[0] = False
        if not remove.any():
            return False
    fold = remove & ~unread & (constant != 0)
    b_bias = None if b.bias is None else b.bias.clone()
    if fold.any():
        b_bias += (groups[fold].sum(-1) * constant[fold].unsqueeze(1)).sum(0)
    keep = ~remove
    a_bias = None if a.bias is None else a.bias[keep]
    layers[ai] = _rebuild(a, a.weight[keep], a_bias)
    kept_groups = groups[keep]  # (kept, out_b, per)
    if isinstance(b, nn.Linear):
        b_weight = kept_groups.transpose(0, 1).reshape(b.out_features, -1)
    else:
        b_weight = kept_groups.transpose(0, 1).reshape(
            b.out_channels, int(keep.sum()), *b.kernel_size
        )
    layers[bi] = _rebuild(b, b_weight, b_bias)
    return True


def _select_read_features(layers: list[nn.Module]) -> None:
    """Replace every Flatten that feeds a linear layer by an InputSelect of the features
    that layer reads: the input pixels of an MLP, and after a convolution the single
    positions of the kept channels (a channel none of whose positions is read is already
    gone, step 3)."""
    for i, (flatten, linear) in enumerate(pairwise(list(layers))):
        if not isinstance(flatten, nn.Flatten) or not isinstance(linear, nn.Linear):
            continue
        read = (linear.weight != 0).any(0)
        if read.all():
            continue
        if not read.any():
            read[0] = True
        layers[i] = InputSelect(read.nonzero().flatten(), linear.in_features)
        layers[i + 1] = _rebuild(linear, linear.weight[:, read], linear.bias)


def _shrink_sequential(model: nn.Module) -> nn.Sequential:
    layers = list(_fold_sequential(model))
    weight_at = [i for i, m in enumerate(layers) if isinstance(m, _WEIGHT)]
    changed = True
    while changed:
        changed = False
        for ai, bi in pairwise(weight_at):
            changed |= _prune_pair(layers, ai, bi)
    _select_read_features(layers)
    return nn.Sequential(*layers).eval()


_Transform = Callable[[nn.Module], nn.Sequential]


def _replace_sequentials(module: nn.Module, transform: _Transform, prefix: str = "") -> list[str]:
    """Replace, in place, every outermost ``Sequential`` below ``module`` that ``transform`` takes.

    A part that ``transform`` rejects (ValueError) is searched for smaller parts
    instead. Returns the qualified names of the replaced parts.
    """
    replaced = []
    for name, child in list(module.named_children()):
        if type(child) is nn.Sequential:  # a subclass may have its own forward
            try:
                setattr(module, name, transform(child))
                replaced.append(prefix + name)
                continue
            except ValueError:
                pass
        replaced += _replace_sequentials(child, transform, f"{prefix}{name}.")
    return replaced


def _apply(
    model: nn.Module, transform: _Transform, thresholds: dict[str, Threshold]
) -> tuple[nn.Module, list[str]]:
    """``transform`` of a supported sequential model, else of every supported part of the model.

    The model is first made deterministic at ``thresholds``
    (:func:`~vbdropout.nn.deterministic.to_deterministic`); it counts as sequential
    when that is a plain ``nn.Sequential`` (e.g. adversarial dropout's wrapper becomes one).
    """
    plain = to_deterministic(model, **thresholds)
    if type(plain) is nn.Sequential:
        try:
            return transform(plain), [""]  # "": the model itself
        except ValueError:
            pass
    return plain.eval(), _replace_sequentials(plain, transform)


@torch.no_grad()
def fold_scales(
    model: nn.Module, *, log_alpha_threshold: Threshold = "own", unit_threshold: Threshold = "own"
) -> nn.Module:
    """The deterministic model with every :class:`Scale` folded into its weight layer.

    A sequential model becomes one flat ``Sequential``; any other model keeps its
    structure with each supported ``Sequential`` inside it folded and flattened.
    """
    return fold_scales_with_parts(
        model, log_alpha_threshold=log_alpha_threshold, unit_threshold=unit_threshold
    )[0]


@torch.no_grad()
def fold_scales_with_parts(
    model: nn.Module, *, log_alpha_threshold: Threshold = "own", unit_threshold: Threshold = "own"
) -> tuple[nn.Module, list[str]]:
    """:func:`fold_scales` and the qualified names of the parts it replaced (as
    :func:`shrink_with_parts`)."""
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    return _apply(model, _fold_sequential, thresholds)


@torch.no_grad()
def shrink(
    model: nn.Module, *, log_alpha_threshold: Threshold = "own", unit_threshold: Threshold = "own"
) -> nn.Module:
    """A physically smaller plain model computing ``model.eval()`` (see the module doc).

    A supported sequential model becomes one plain ``nn.Sequential``; any other
    model keeps its ``forward`` with its supported ``Sequential`` parts shrunk.
    """
    return shrink_with_parts(
        model, log_alpha_threshold=log_alpha_threshold, unit_threshold=unit_threshold
    )[0]


@torch.no_grad()
def shrink_with_parts(
    model: nn.Module, *, log_alpha_threshold: Threshold = "own", unit_threshold: Threshold = "own"
) -> tuple[nn.Module, list[str]]:
    """:func:`shrink` and the qualified names of the parts it replaced (``[""]`` when
    it shrank the whole model as one ``Sequential``)."""
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    return _apply(model, _shrink_sequential, thresholds)


def neurons_per_layer(network: nn.Module) -> list[int]:
    """Units per layer as Table 5 prints them.

    Each convolution contributes its output channels, each linear layer its
    input features (after :func:`shrink`, the inputs it reads); a network without convolutions
    also lists the classifier's outputs (784-500-300-10 vs 20-50-800-500).
    """
    layers = [m for m in network.modules() if isinstance(m, _WEIGHT)]
    counts = [m.out_channels if isinstance(m, nn.Conv2d) else m.in_features for m in layers]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if linears and len(linears) == len(layers):
        counts.append(linears[-1].out_features)
    return counts
