"""The layer-by-layer driver every compression method runs through.

:func:`compress_layers` works GPTQ-style, so memory holds one group of linears' statistics and two hidden-state
streams, the original X and the compressed X': for each decoder layer (:func:`compress_layer`, the per-layer body
that the layer-streamed path :mod:`odllm.compress.streamed` runs too) it sums per-linear input statistics with
hooks (:mod:`odllm.compress.statistics`) on the stream the algorithm asks for, one group of linears sharing an
input at a time, and lets the algorithm replace each linear of the group before the next group's statistics are
summed (with ``true_sequential`` those come from the layer whose earlier groups are already replaced, else from
the dense layer), optionally lets it refine the layer on the compressed stream (:mod:`odllm.compress.align`),
measures the layer's output error and advances both streams. The algorithms:
``LowRank`` (odllm, svd, svd_whiten, svd_align, asvd; :mod:`odllm.compress.lowrank_method`), ``GPTQ``,
``SparseGPT``, ``BitsAndBytes``; :mod:`odllm.compress.registry` maps a method config to one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from odllm.compress.statistics import InputCovariances, LinearStatistics, StopForward, input_groups, real_tokens
from odllm.compress.storage import is_compressed, sizes, storage, totals
from odllm.eval.generation import model_device

log = logging.getLogger(__name__)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_projection(module: nn.Module) -> bool:
    """A dense linear, or what a method (or a fused benchmark model) put in its place."""
    return isinstance(module, nn.Linear) or is_compressed(module) or hasattr(module, "out_features")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers at ``model.model.layers``: the layout of LLaMA, Mistral, Qwen2/Qwen3 and most HF decoders.

    Every method replaces the ``nn.Linear`` modules inside them, so a peft wrapper (LoRA not merged) and layers
    without ``nn.Linear`` (GPT-2's Conv1D) are refused with what was expected instead.
    """
    name = type(model).__name__
    if hasattr(model, "peft_config"):
        raise TypeError(f"{name} holds unmerged peft (LoRA) adapters: merge LoRA first (odllm.model.backbone.merge) "
                        "so that the decoder layers hold plain nn.Linear projections")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        children = [child for child, _ in model.named_children()]
        raise TypeError(
            f"{name} has no decoder layers at model.model.layers; expected the Hugging Face decoder layout of "
            f"LLaMA, Mistral, Qwen2/Qwen3 (a ModuleList of layers with nn.Linear projections "
            f"{', '.join(PROJECTIONS)}); this model's top-level modules are {children}"
        )
    empty = [i for i, layer in enumerate(layers) if not any(_is_projection(m) for m in layer.modules())]
    if empty:
        raise TypeError(f"{name}: decoder layers {empty} hold no nn.Linear (expected projections such as "
                        f"{', '.join(PROJECTIONS)}); layers of other modules (GPT-2's Conv1D) are not supported")
    return layers


def forward_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returned a tuple


def layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[dict]) -> tuple[list, list[dict]]:
    """Hidden states and keyword arguments (mask, rotary embeddings, positions) layer 0 gets per batch; the
    forward stops there, so the layers may still be on the meta device (:mod:`odllm.compress.streamed`)."""
    hidden, kwargs = [], []

    def catch(module: nn.Module, args: tuple, kw: dict) -> None:
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
            try:
                model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                      use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@dataclass
class Streams:
    """Per calibration batch: the original stream X, the compressed stream X' (hidden states entering the
    current layer), the other arguments the decoder layers get, and the non-pad token mask."""

    X: list[torch.Tensor]
    Xc: list[torch.Tensor]
    kwargs: list[dict]
    masks: list[torch.Tensor]

    def __iter__(self):
        return zip(self.X, self.Xc, self.kwargs, self.masks, strict=True)


def compare_layers(
    original, layer, streams: Streams, *, advance_original: bool = False, advance_compressed: bool = False
) -> float:
    """||layer(X') - original(X)||^2 / ||original(X)||^2 over non-pad tokens. ``original=None`` means X
    already holds the original outputs; ``advance_*`` replaces that stream by the outputs (next inputs)."""
    error = reference = 0.0
    for b, (x, xc, kw, mask) in enumerate(streams):
        y = x if original is None else forward_layer(original, x, kw)
        yc = forward_layer(layer, xc, kw)
        error += real_tokens(yc - y, mask).double().square().sum().item()
        reference += real_tokens(y, mask).double().square().sum().item()
        if advance_original:
            streams.X[b] = y
        if advance_compressed:
            streams.Xc[b] = yc
    return error / reference


class LayerAlgorithm(Protocol):
    """What :func:`compress_layers` asks of a method.

    ``statistics``: which stream the input statistics come from ("original", "compressed" or "none");
    ``sequential``: whether each layer is measured on, and the next fed by, the compressed stream;
    ``true_sequential`` (optional, default False): collect the statistics group by group ([q, k, v], [o],
    [gate, up], [down]) on the layer with the earlier groups already replaced, as the reference GPTQ's
    ``--true-sequential`` and llm-compressor; False: every group's statistics from the dense layer.
    """

    statistics: str
    sequential: bool

    def settings(self) -> dict: ...

    def validate(self, name: str, linear: nn.Linear) -> None: ...

    def compress_linear(
        self, name: str, linear: nn.Linear, stats: LinearStatistics | None
    ) -> tuple[nn.Module | None, dict]: ...

    def refine(self, original, layer, replaced: dict, groups: list, entries: dict, streams: Streams) -> dict | None:
        ...


def _entry(name: str, linear: nn.Linear, module: nn.Module | None, found: dict) -> dict:
    """A matrix's report entry: the algorithm's own fields plus name, shape, numbers and bytes before/after."""
    before, after = storage([linear]), storage([module if module is not None else linear])
    entry = {"name": name, "shape": list(linear.weight.shape), **found}
    entry.update(params_before=before["params"], params_after=after["params"], bytes_before=before["bytes"],
                 bytes_after=after["bytes"])
    return entry


def _stop(module: nn.Module, inputs: tuple) -> None:
    raise StopForward


def _collect(layer: nn.Module, modules: dict, source: list, streams: Streams, stop: nn.Module | None
             ) -> InputCovariances:
    """Input statistics of ``modules`` over every calibration batch of ``source`` through ``layer``; the forward
    ends at ``stop`` (once its statistics are in) when given."""
    with InputCovariances(modules) as stats:
        handle = stop.register_forward_pre_hook(_stop) if stop is not None else None  # after the statistics hook
        try:
            for x, kw, mask in zip(source, streams.kwargs, streams.masks, strict=True):
                stats.mask = mask
                try:
                    forward_layer(layer, x, kw)
                except StopForward:
                    pass
        finally:
            if handle is not None:
                handle.remove()
    return stats


def _statistics_by_group(algorithm: LayerAlgorithm, original: nn.Module, layer: nn.Module, linears: dict,
                         streams: Streams):
    """Yield ``(names, stats)`` one group of linears sharing an input at a time ([q, k, v], [o], [gate, up],
    [down]), lazily, so that the caller replaces (and frees the statistics of) a group's linears before the next
    group's statistics are collected: memory holds one group's statistics, not the layer's (at LLaMA-1B width the
    float64 sums of one layer are 0.7 GB, 0.5 GB of them down_proj's). Without ``true_sequential`` they come from
    the dense copy ``original`` (each forward ending at the group's last linear; the sums are the ones a single
    pass gives), with it from ``layer``, whose earlier groups are already replaced. ``stats`` is None for
    ``statistics: none``."""
    if algorithm.statistics == "none":
        yield list(linears), None
        return
    source = streams.Xc if algorithm.statistics == "compressed" else streams.X
    sequential = getattr(algorithm, "true_sequential", False)
    groups = input_groups(original, source[0], streams.kwargs[0], linears)
    for g, group in enumerate(groups):
        modules = {name: (layer if sequential else original).get_submodule(name) for name in group}
        stop = modules[group[-1]] if g < len(groups) - 1 else None
        yield group, _collect(layer if sequential else original, modules, source, streams, stop)


def compress_layer(
    layer: nn.Module, prefix: str, index: int, streams: Streams, algorithm: LayerAlgorithm
) -> tuple[list[dict], dict]:
    """Compress one decoder layer in place and advance both streams; returns ``(matrix entries, layer report)``.

    The body of :func:`compress_layers`, shared with the layer-streamed path (:mod:`odllm.compress.streamed`).
    ``prefix`` names the layer in the model (``model.layers.3``). The dense reference ``original`` is a copy of
    the layer's modules that shares its tensors (no second copy of the weights): methods replace modules of
    ``layer``, never write into the dense weights.
    """
    original = copy.deepcopy(layer, memo={id(t): t for t in (*layer.parameters(), *layer.buffers())})
    linears = {name: m for name, m in original.named_modules() if isinstance(m, nn.Linear)}
    replaced, entries, groups = {}, {}, []
    for group, stats in _statistics_by_group(algorithm, original, layer, linears, streams):
        groups += stats.groups if stats is not None else []
        for name in group:
            linear = linears[name]
            full_name = f"{prefix}.{name}"
            module, found = algorithm.compress_linear(full_name, linear, stats and stats.statistics(name))
            entries[name] = _entry(full_name, linear, module, found)
            if stats is not None:
                entries[name]["tokens"] = stats.tokens[name]
            if module is not None:
                layer.set_submodule(name, module)
                replaced[name] = module
        del stats  # this group's statistics (n x n float64 per linear) go before the next group's are summed
    entries = {name: entries[name] for name in linears}  # the report in module order whatever the groups

    report = {"layer": index, "input_stream": "compressed" if algorithm.sequential else "original"}
    if getattr(algorithm, "true_sequential", False):
        report["statistics_groups"] = groups
    refined = None
    if algorithm.sequential and replaced:
        refined = algorithm.refine(original, layer, replaced, groups, entries, streams)
    if refined is not None:
        report.update(refined)
    else:
        if not algorithm.sequential:
            streams.Xc = list(streams.X)  # measure this layer on the original stream
        report["output_error"] = compare_layers(
            original, layer, streams, advance_original=True, advance_compressed=algorithm.sequential
        )
    log.debug("layer %d: %s", index, report)
    return list(entries.values()), report


def validate_layer(layer: nn.Module, prefix: str, algorithm: LayerAlgorithm) -> None:
    """Every linear of ``layer`` checked by the algorithm (shapes, settings) before any work."""
    for name, linear in layer.named_modules():
        if isinstance(linear, nn.Linear):
            algorithm.validate(f"{prefix}.{name}", linear)


def calibration_masks(batches: list[dict]) -> list[torch.Tensor]:
    """Per batch the tokens statistics and errors use: ``statistics_mask`` (default: every non-pad token)."""
    return [batch.get("statistics_mask", batch["attention_mask"]).bool() for batch in batches]


def settings_report(algorithm: LayerAlgorithm, masks: list[torch.Tensor]) -> dict:
    return {
        **algorithm.settings(),
        "calibration_sequences": sum(len(mask) for mask in masks),
        "calibration_tokens": int(sum(mask.sum() for mask in masks)),
    }


@torch.no_grad()
def compress_layers(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], algorithm: LayerAlgorithm, *, progress: bool = True
) -> dict:
    """Compress ``model`` in place with ``algorithm``, one decoder layer at a time; returns the report.

    ``batches``: dicts with left-padded ``input_ids`` and ``attention_mask`` ``[B, T]`` (and optionally a
    ``statistics_mask``); pad tokens count nowhere. Every linear's shape is validated before any work.
    The batches are moved to the model's device; every stream, statistic and factor stays there, in the model's
    dtype (statistics: float64 sums, :mod:`odllm.compress.statistics`).

    Memory: both streams (2 x size x tokens x hidden), one group's statistics, and the layer's compressed modules
    beside its dense ones; the whole model is resident (the caller, ``odllm.compress.pipeline``, also holds the
    dense model). :mod:`odllm.compress.streamed` runs the same :func:`compress_layer` on a model read from its
    shards one layer at a time.
    """
    layers = decoder_layers(model)
    if any(is_compressed(m) for m in layers.modules()):
        raise ValueError("the model is already compressed: pass the dense model")
    names = {module: name for name, module in model.named_modules()}
    for layer in layers:
        validate_layer(layer, names[layer], algorithm)
    training = model.training
    model.eval()
    device = model_device(model)
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    sizes_before = sizes(model, layers)
    masks = calibration_masks(batches)
    X, kwargs = layer_inputs(model, layers, batches)
    streams = Streams(X, list(X), kwargs, masks)
    matrices, layer_reports = [], []
    for i, layer in enumerate(tqdm(layers, desc="compress layers", disable=not progress)):
        entries, report = compress_layer(layer, names[layer], i, streams, algorithm)
        matrices += entries
        layer_reports.append(report)

    model.train(training)
    return {
        "settings": settings_report(algorithm, masks),
        "matrices": matrices,
        "layers": layer_reports,
        "totals": totals(sizes_before, sizes(model, layers)),
        "spectra": getattr(algorithm, "spectra", {}),
    }
