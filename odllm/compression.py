"""OD-LLM compression of a causal LM: whitened truncated SVD of every decoder linear + progressive alignment.

Layer by layer (GPTQ-style, so memory holds one layer's statistics and two hidden-state streams):

1. run the original layer i on the original stream X_i; hooks sum C = sum x x^T per linear (non-pad tokens);
2. factorise each linear at the rank its share ``ratio`` of parameters allows (``odllm.lowrank``), whitened
   by the Cholesky factor of C or plain;
3. with ``align``: on the compressed stream X'_i (what layer i really sees after the compressed layers 0..i-1)
   refit B of each factorised linear so that B A x' matches W x, by ridge least squares
       G = sum (A x')(A x')^T,   H = sum (W x)(A x')^T,   B = H (G + lambda I)^{-1},  lambda = ridge tr(G)/k,
   one group of linears sharing an input at a time ([q,k,v], [o], [gate,up], [down]), so o_proj and down_proj
   are fitted to the inputs they will really get. A refit is kept only where it lowers that linear's error,
   and the whole layer's refit is undone if it raised the layer's output error;
4. advance: X_{i+1} = layer_i(X_i), X'_{i+1} = compressed layer_i(X'_i).

``ratio`` is the fraction of each decoder linear's parameters kept: a factorised m x n matrix of rank
k = floor(ratio m n / (m + n)) stores k (m + n) <= ratio m n numbers. Embeddings, lm_head and norms stay
dense; the report gives decoder-only and whole-model sizes.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from odllm.calibration import InputCovariances, StopForward, capture_inputs, real_tokens
from odllm.lowrank import LowRankLinear, cholesky_with_jitter, factorize, rank_for_ratio

log = logging.getLogger(__name__)

COMPRESSION_FILE = "compression.json"
RATIO_MEANING = (
    "fraction of each decoder linear's parameters kept: an m x n matrix becomes rank "
    "k = floor(ratio*m*n/(m+n)), k*(m+n) parameters; kept dense when that saves nothing or ratio == 1; "
    "embeddings, lm_head and norms stay dense"
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


def _forward(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returned a tuple


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[dict]) -> tuple[list, list[dict]]:
    """Hidden states and keyword arguments (mask, rotary embeddings, positions) layer 0 gets per batch."""
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
class _Streams:
    """Per calibration batch: the original stream X, the compressed stream X' (hidden states entering the
    current layer), the other arguments the decoder layers get, and the non-pad token mask."""

    X: list[torch.Tensor]
    Xc: list[torch.Tensor]
    kwargs: list[dict]
    masks: list[torch.Tensor]

    def __iter__(self):
        return zip(self.X, self.Xc, self.kwargs, self.masks, strict=True)


def _compare_layers(
    original, layer, streams: _Streams, *, advance_original: bool = False, advance_compressed: bool = False
) -> float:
    """||layer(X') - original(X)||^2 / ||original(X)||^2 over non-pad tokens. ``original=None`` means X
    already holds the original outputs; ``advance_*`` replaces that stream by the outputs (next inputs)."""
    error = reference = 0.0
    for b, (x, xc, kw, mask) in enumerate(streams):
        y = x if original is None else _forward(original, x, kw)
        yc = _forward(layer, xc, kw)
        error += real_tokens(yc - y, mask).double().square().sum().item()
        reference += real_tokens(y, mask).double().square().sum().item()
        if advance_original:
            streams.X[b] = y
        if advance_compressed:
            streams.Xc[b] = yc
    return error / reference


def _factorise_linear(name: str, linear: nn.Linear, C: torch.Tensor, ratio: float, whiten: bool):
    """``(LowRankLinear or None when kept dense, report entry, truncated spectrum or None)``."""
    m, n = linear.weight.shape
    params = sum(p.numel() for p in linear.parameters())
    entry = {"name": name, "shape": [m, n], "rank": "dense", "params_before": params, "params_after": params}
    k = rank_for_ratio(m, n, ratio)
    if k is None:
        return None, entry, None
    S, jitter = cholesky_with_jitter(C)
    if jitter:
        log.info("%s: input covariance is singular, added jitter %.3g * I before Cholesky", name, jitter)
    W = linear.weight.double()
    B, A, sigma = factorize(W, S if whiten else None, k)
    whitened = sigma if whiten else torch.linalg.svdvals(W @ S)
    module = LowRankLinear.from_factors(B.to(linear.weight.dtype), A.to(linear.weight.dtype), linear.bias)
    D = W - module.B.weight.double() @ module.A.weight.double()
    error, energy = ((D @ C) * D).sum().item(), ((W @ C) * W).sum().item()
    entry.update(
        rank=k,
        params_after=sum(p.numel() for p in module.parameters()),
        predicted_error=sigma[k:].square().sum().item(),  # plain SVD: the weight error ||W - W'||_F^2
        whitened_prediction=whitened[k:].square().sum().item(),
        output_error=error,
        relative_output_error=error / energy if energy else 0.0,
        jitter=jitter,
    )
    return module, entry, sigma.tolist()


def _refit_group(original, layer, group: dict[str, LowRankLinear], streams: _Streams, ridge: float) -> dict:
    """Ridge least squares for B of each linear in ``group`` (they share one input): B A x' ~ W x.

    The accumulators give each linear's error exactly, E(B) = tr(B G B^T) - 2 tr(B H^T) + sum ||W x||^2,
    so a refit is kept only where E falls. Returns per linear the relative errors and the decision.
    """
    dense = {name: original.get_submodule(name) for name in group}
    G = {name: torch.zeros(mod.rank, mod.rank, dtype=torch.float64) for name, mod in group.items()}
    H = {name: torch.zeros(mod.out_features, mod.rank, dtype=torch.float64) for name, mod in group.items()}
    energy = dict.fromkeys(group, 0.0)
    for x, xc, kw, mask in streams:
        inputs = capture_inputs(original, x, kw, dense, mask)
        inputs_c = capture_inputs(layer, xc, kw, group, mask)
        for name, module in group.items():
            # W x and A x' in the model's precision, as the layers compute them; the sums in float64
            y = (inputs[name] @ dense[name].weight.T).double()  # the bias cancels on both sides
            z = module.A(inputs_c[name]).double()
            G[name] += z.T @ z
            H[name] += y.T @ z
            energy[name] += y.square().sum().item()
    results = {}
    for name, module in group.items():
        g, h, k = G[name], H[name], module.rank
        L, _ = cholesky_with_jitter(g + ridge * g.trace() / k * torch.eye(k, dtype=g.dtype))
        refit = torch.cholesky_solve(h.T, L).T
        before, after = (
            ((B @ g) * B).sum().item() - 2 * (B * h).sum().item() + energy[name]
            for B in (module.B.weight.double(), refit)
        )
        if after < before:
            module.B.weight.copy_(refit)
        scale = energy[name] or 1.0
        results[name] = {
            "error_before": before / scale, "error_refit": after / scale, "refit_kept": after < before
        }
    return results


def _align_layer(original, layer, factorised: dict, groups, entries: dict, streams: _Streams, ridge) -> dict:
    """Refits the layer's factorised linears group by group on the compressed stream, undoes them all if the
    layer's output error rose, and advances both streams. Returns the layer's errors and the decision."""
    before = _compare_layers(original, layer, streams)
    saved = {name: module.B.weight.clone() for name, module in factorised.items()}
    for group in groups:
        members = {name: factorised[name] for name in group if name in factorised}
        if members:
            for name, result in _refit_group(original, layer, members, streams, ridge).items():
                entries[name]["alignment"] = result
    # the original stream moves on here: the decision below does not touch it
    with_refit = _compare_layers(original, layer, streams, advance_original=True)
    kept = with_refit <= before
    if not kept:
        for name, module in factorised.items():
            module.B.weight.copy_(saved[name])
            entries[name]["alignment"]["refit_kept"] = False
    return {
        "error_before_alignment": before,
        "error_with_refit": with_refit,
        "alignment_kept": kept,
        "output_error": _compare_layers(None, layer, streams, advance_compressed=True),
    }


def _parameter_size(parameters) -> dict:
    unique = {id(p): p for p in parameters}.values()  # tied embeddings count once
    return {
        "params": sum(p.numel() for p in unique),
        "bytes": sum(p.numel() * p.element_size() for p in unique),
    }


def _sizes(model: nn.Module, layers: nn.ModuleList) -> dict:
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    return {
        "decoder_linear": _parameter_size(p for m in linears for p in m.parameters()),
        "model": _parameter_size(model.parameters()),
    }


def _totals(before: dict, after: dict) -> dict:
    return {
        part: {
            "params_before": before[part]["params"],
            "params_after": after[part]["params"],
            "bytes_before": before[part]["bytes"],
            "bytes_after": after[part]["bytes"],
            "params_kept": after[part]["params"] / before[part]["params"],
        }
        for part in before
    }


@torch.no_grad()
def compress_model(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    ratio: float,
    whiten: bool,
    align: bool,
    ridge: float = 1e-4,
    progress: bool = True,
) -> dict:
    """Compress ``model`` in place; returns a JSON-serialisable report (``report["spectra"]`` for plots).

    ``batches``: dicts with left-padded ``input_ids`` and ``attention_mask`` ``[B, T]``; pad tokens count
    nowhere. Without ``align`` only the original stream is needed and each layer's output error is measured
    on it; with ``align`` it is measured on the compressed stream, before and after the refit.
    """
    layers = decoder_layers(model)
    if any(isinstance(m, LowRankLinear) for m in layers.modules()):
        raise ValueError("the model is already compressed: pass the dense model")
    for layer in layers:  # validate ratio and every shape before any work
        for linear in layer.modules():
            if isinstance(linear, nn.Linear):
                rank_for_ratio(*linear.weight.shape, ratio)
    training = model.training
    model.eval()
    names = {module: name for name, module in model.named_modules()}
    sizes_before = _sizes(model, layers)
    # statistics and errors use only the tokens named by ``statistics_mask`` (default: every non-pad token)
    masks = [batch.get("statistics_mask", batch["attention_mask"]).bool() for batch in batches]
    X, kwargs = _layer_inputs(model, layers, batches)
    streams = _Streams(X, list(X), kwargs, masks)
    matrices, layer_reports, spectra = [], [], {}

    for i, layer in enumerate(tqdm(layers, desc="compress layers", disable=not progress)):
        original = copy.deepcopy(layer)
        linears = {name: m for name, m in original.named_modules() if isinstance(m, nn.Linear)}
        with InputCovariances(linears) as stats:
            for x, _, kw, mask in streams:
                stats.mask = mask
                _forward(original, x, kw)

        factorised, entries = {}, {}
        for name, linear in linears.items():
            full_name = f"{names[layer]}.{name}"
            C = stats.covariance[name]
            module, entries[name], spectrum = _factorise_linear(full_name, linear, C, ratio, whiten)
            entries[name]["tokens"] = stats.tokens[name]
            if module is not None:
                layer.set_submodule(name, module)
                factorised[name] = module
                spectra[full_name] = spectrum
        matrices += entries.values()

        report = {"layer": i, "input_stream": "compressed" if align else "original"}
        if align and factorised:
            report.update(_align_layer(original, layer, factorised, stats.groups, entries, streams, ridge))
        else:
            if not align:
                streams.Xc = list(streams.X)  # measure this layer on the original stream
            report["output_error"] = _compare_layers(
                original, layer, streams, advance_original=True, advance_compressed=align
            )
        layer_reports.append(report)
        log.debug("layer %d: %s", i, report)

    model.train(training)
    return {
        "settings": {
            "ratio": ratio,
            "ratio_meaning": RATIO_MEANING,
            "whiten": whiten,
            "align": align,
            "ridge": ridge,
            "calibration_sequences": sum(len(mask) for mask in masks),
            "calibration_tokens": int(sum(mask.sum() for mask in masks)),
        },
        "matrices": matrices,
        "layers": layer_reports,
        "totals": _totals(sizes_before, _sizes(model, layers)),
        "spectra": spectra,
    }


def plot_spectra(report: dict, path: str | Path) -> Path:
    """PNG of sigma_i / sigma_1 per matrix type (one line per layer), a dot at the kept rank."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend; PNG renders with Agg

    ranks = {entry["name"]: entry["rank"] for entry in report["matrices"]}
    kinds = defaultdict(list)
    for name in report["spectra"]:
        kinds[name.rsplit(".", 1)[-1]].append(name)
    cols = min(4, max(1, len(kinds)))
    rows = -(-max(1, len(kinds)) // cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, (kind, names) in zip(axes, kinds.items(), strict=False):
        for depth, name in enumerate(names):
            sigma = report["spectra"][name]
            top = sigma[0] or 1.0
            normalized = [max(s / top, 1e-12) for s in sigma]
            color = colormaps["viridis"](depth / max(1, len(names) - 1))
            ax.semilogy(range(1, len(sigma) + 1), normalized, lw=0.8, color=color)
            ax.plot(ranks[name], normalized[ranks[name] - 1], "o", ms=3, color=color)
        ax.set_title(kind)
        ax.set_xlabel("index i")
    for ax in axes[len(kinds) :]:
        ax.set_axis_off()
    axes[0].set_ylabel("sigma_i / sigma_1")
    if not kinds:
        axes[0].set_axis_on()
        axes[0].text(0.5, 0.5, "no factorised matrices", ha="center", transform=axes[0].transAxes)
    settings = report["settings"]
    fig.suptitle(
        f"singular values of {'W S (whitened)' if settings['whiten'] else 'W'}, ratio={settings['ratio']}: "
        "dot = kept rank, colour = layer (dark = first)"
    )
    fig.savefig(path, dpi=120)
    return Path(path)


def save_compression_config(model: nn.Module, directory: str | Path) -> Path:
    """Writes ``compression.json``: the rank of every LowRankLinear, keyed by module name."""
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    path = Path(directory) / COMPRESSION_FILE
    path.write_text(json.dumps(ranks, indent=2))
    return path


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for file in files:
        if not (directory / file).exists():
            raise FileNotFoundError(f"{directory / file} is missing: save with safe_serialization=True")
        state.update(load_file(directory / file))
    return state


def load_compressed(directory: str | Path) -> nn.Module:
    """The model saved in ``directory``: LowRankLinear where compression.json says, else a plain HF model."""
    directory = Path(directory)
    if not (directory / COMPRESSION_FILE).exists():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ranks = json.loads((directory / COMPRESSION_FILE).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{COMPRESSION_FILE} names {name}, a {type(linear).__name__}, not a Linear")
        model.set_submodule(
            name, LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        )
    state = _read_safetensors(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = defaultdict(list)  # tied weights are saved once, under one of their names
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    loaded = {name for names in aliases.values() if any(n in state for n in names) for name in names}
    missing = [key for key in missing if key not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"{directory} does not match {COMPRESSION_FILE}: missing {missing}, unexpected {unexpected}"
        )
    if (directory / "generation_config.json").exists():  # as from_pretrained would
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()
