"""Model surgery helpers for BERT-like classifiers, public so that built-in and third-party technique
plugins share one tested implementation (finding the encoder layers, slicing Linear layers, replacing
modules, physically removing heads, FFN neurons and whole layers).

Every helper is safe on models whose layers share modules (cross-layer weight sharing): functions that
change modules visit each distinct module object once, via :func:`unique_layers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn


def base_model(model: "nn.Module") -> "nn.Module":
    """The base model (``model.bert`` for BERT, ``model.base_model`` for BERT clones), or ``model``."""
    from torch import nn

    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):
        return base
    base = getattr(model, "bert", None)
    return base if isinstance(base, nn.Module) else model


def base_prefix(model: "nn.Module") -> str:
    """The attribute name of the base model (``"bert"`` for BERT), or ``""`` if ``model`` is one."""
    from torch import nn

    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def encoder_layers(model: "nn.Module") -> "nn.ModuleList":
    """The encoder layers of a BERT-like model; ``ValueError`` naming the model class if it has none."""
    layers = getattr(getattr(base_model(model), "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .bert.encoder.layer: not a BERT-like model")
    return layers


def unique_layers(model: "nn.Module") -> Iterator[tuple[int, "nn.Module"]]:
    """``(position, layer)`` for each distinct layer object (the first position of a shared layer)."""
    seen: set[int] = set()
    for i, layer in enumerate(encoder_layers(model)):
        if id(layer) not in seen:
            seen.add(id(layer))
            yield i, layer


def head_counts(model: "nn.Module") -> list[int]:
    """The current number of attention heads in each encoder layer position."""
    return [int(layer.attention.self.num_attention_heads) for layer in encoder_layers(model)]


def ffn_sizes(model: "nn.Module") -> list[int]:
    """The current intermediate (FFN) width of each encoder layer position."""
    return [int(layer.intermediate.dense.out_features) for layer in encoder_layers(model)]


def set_module(model: "nn.Module", name: str, module: "nn.Module") -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def sliced_linear(linear: "nn.Linear", index: "torch.Tensor", dim: int) -> "nn.Linear":
    """A new ``nn.Linear`` keeping ``index`` along weight dim ``dim`` (0: output rows, 1: input columns).
    Keeps device, dtype, ``requires_grad`` and train/eval mode.

    A module that is not an ``nn.Linear`` but computes a linear map (e.g. a low-rank factorised one) can
    take part by defining ``sliced(index, dim) -> nn.Module`` with the same meaning."""
    import torch
    from torch import nn

    if not isinstance(linear, nn.Linear):
        sliced = getattr(linear, "sliced", None)
        if sliced is None:
            raise TypeError(f"cannot slice a {type(linear).__name__}: it is not an nn.Linear and defines no "
                            f"sliced(index, dim)")
        return sliced(index, dim)

    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device))
    out_features, in_features = weight.shape
    # skip_init: the weights are overwritten right away, no point in running the random init.
    new = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    new.train(linear.training)
    return new


def prune_heads(model: "nn.Module", heads_to_keep: Sequence[Sequence[int]]) -> None:
    """Keep only ``heads_to_keep[i]`` (indices into layer ``i``'s *current* heads) in each encoder layer.

    Slices query/key/value output rows and the attention output projection's input columns, and updates
    ``num_attention_heads`` / ``all_head_size``. Layers that keep all their heads are left untouched (same
    module objects), so keeping everything is an exact identity. A layer object shared by several
    positions is pruned once; all its positions must then ask for the same heads.

    transformers v5 reshapes to ``(*shape, -1, head_size)`` and takes the head count from the tensor
    shape, so a layer with fewer heads just works as long as it keeps at least one head.
    """
    import torch

    layers = encoder_layers(model)
    if len(heads_to_keep) != len(layers):
        raise ValueError(f"heads_to_keep has {len(heads_to_keep)} entries for {len(layers)} layers")
    done: dict[int, list[int]] = {}
    for i, (layer, keep) in enumerate(zip(layers, heads_to_keep)):
        keep = sorted(int(h) for h in keep)
        if id(layer) in done:
            if done[id(layer)] != keep:
                raise ValueError(f"layer {i} shares its weights with an earlier layer that keeps heads "
                                 f"{done[id(layer)]}; shared layers must keep the same heads (asked {keep})")
            continue
        attn = layer.attention.self
        n_heads, head_size = int(attn.num_attention_heads), int(attn.attention_head_size)
        if not keep:
            raise ValueError(f"layer {i}: every layer must keep at least one head")
        if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n_heads:
            raise ValueError(f"layer {i}: invalid heads {keep} for a layer with {n_heads} heads")
        done[id(layer)] = keep
        if keep == list(range(n_heads)):
            continue
        index = torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in keep])
        attn.query = sliced_linear(attn.query, index, 0)
        attn.key = sliced_linear(attn.key, index, 0)
        attn.value = sliced_linear(attn.value, index, 0)
        layer.attention.output.dense = sliced_linear(layer.attention.output.dense, index, 1)
        attn.num_attention_heads = len(keep)
        attn.all_head_size = len(keep) * head_size


def prune_ffn_neurons(model: "nn.Module", neurons_to_keep: Sequence[Sequence[int]]) -> None:
    """Keep only ``neurons_to_keep[i]`` of layer ``i``'s intermediate (FFN) neurons: slices the rows of
    ``intermediate.dense`` and the columns of ``output.dense``. At least one neuron per layer is kept (a
    0-wide Linear is legal in torch but pointless; remove the layer instead). Shared layer objects are
    sliced once, like :func:`prune_heads`."""
    import torch

    layers = encoder_layers(model)
    if len(neurons_to_keep) != len(layers):
        raise ValueError(f"neurons_to_keep has {len(neurons_to_keep)} entries for {len(layers)} layers")
    done: dict[int, list[int]] = {}
    for i, (layer, keep) in enumerate(zip(layers, neurons_to_keep)):
        keep = sorted(int(n) for n in keep)
        if id(layer) in done:
            if done[id(layer)] != keep:
                raise ValueError(f"layer {i} shares its weights with an earlier layer; shared layers must "
                                 f"keep the same FFN neurons")
            continue
        width = int(layer.intermediate.dense.out_features)
        if not keep:
            raise ValueError(f"layer {i}: every layer must keep at least one FFN neuron")
        if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= width:
            raise ValueError(f"layer {i}: invalid FFN neurons for a layer of width {width}")
        done[id(layer)] = keep
        if len(keep) == width:
            continue
        index = torch.tensor(keep, dtype=torch.long)
        layer.intermediate.dense = sliced_linear(layer.intermediate.dense, index, 0)
        layer.output.dense = sliced_linear(layer.output.dense, index, 1)


def keep_layers(model: "nn.Module", keep: Sequence[int]) -> None:
    """Keep only encoder layers ``keep`` (distinct indices, in order), deleting the others in place, and
    update every config that records the depth."""
    layers = encoder_layers(model)
    n = len(layers)
    keep = [int(k) for k in keep]
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"invalid layers to keep {keep} for a model with {n} encoder layers")
    # Delete in place so the ModuleList object (which other code may hold) survives; torch renumbers the
    # remaining children 0..m-1, so state-dict keys become <base>.encoder.layer.0..m-1.
    for i in reversed(range(n)):
        if i not in keep:
            del layers[i]
    for position, layer in enumerate(layers):
        # layer_idx only indexes decoder KV caches; keep it equal to the position like a fresh model.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    # The model, base model and encoder normally share one config object; set each one that exists so a
    # re-saved config (or code reading num_hidden_layers) sees the new depth.
    base = base_model(model)
    for owner in (model, base, getattr(base, "encoder", None)):
        config = getattr(owner, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(keep)
