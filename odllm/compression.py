"""Layer-by-layer compression of a causal LM, and OD-LLM: whitened truncated SVD + progressive alignment.

:func:`compress_layers` is the one driver every method goes through (GPTQ-style, so memory holds one layer's
statistics and two hidden-state streams, the original X and the compressed X'): for each decoder layer it
sums per-linear input statistics with hooks (``odllm.calibration``) on the stream the algorithm asks for,
lets the algorithm replace each linear, optionally lets it refine the layer on the compressed stream, measures
the layer's output error and advances both streams. The algorithms: :class:`LowRank` here (odllm, svd,
svd_whiten, svd_align, asvd), ``odllm.gptq.GPTQ``, ``odllm.sparsegpt.SparseGPT``, ``odllm.bnb.BitsAndBytes``;
``odllm.methods`` maps a method config to one.

OD-LLM (:class:`LowRank`), per layer i:

1. run the original layer i on the original stream X_i; hooks sum C = sum x x^T per linear (non-pad tokens);
2. factorise each linear at the rank its share ``ratio`` of parameters allows (``odllm.lowrank``), whitened
   by the Cholesky factor of C, scaled by ASVD's diag(mean|x|^alpha), or plain;
3. with ``align``: on the compressed stream X'_i (what layer i really sees after the compressed layers 0..i-1)
   refit the factors so that B A x' matches W x, from the sums C' = sum x'x'^T, K = sum x x'^T (float64):
   ``align: B`` (the paper) keeps A and solves ridge least squares for B,
       B = W K A^T (A C' A^T + lambda I)^{-1},  lambda = ridge tr(A C' A^T)/k;
   ``align: BA`` (default) refits both: the best rank-k map from x' to W x (reduced-rank regression) is
       W* = W K C'^{-1} truncated by whitened SVD in the C' norm (step 2 again, on the stream the layer sees).
   One group of linears sharing an input at a time ([q,k,v], [o], [gate,up], [down]), so o_proj and down_proj
   are fitted to the inputs they will really get. A refit is kept only where it lowers that linear's error,
   and the whole layer's refit is undone if it raised the layer's output error;
4. advance: X_{i+1} = layer_i(X_i), X'_{i+1} = compressed layer_i(X'_i).

``ratio`` is the fraction of each decoder linear's parameters kept: a factorised m x n matrix of rank
k = floor(ratio m n / (m + n)) stores k (m + n) <= ratio m n numbers. Embeddings, lm_head and norms stay
dense; the report gives decoder-only and whole-model sizes, in numbers and in the bytes really held.

``compression.json`` records every replaced module by name: a bare integer is a LowRankLinear's rank (the
original format, still written for low-rank modules), an object names its kind and settings
(``{"kind": "gptq", "bits": 4, "group_size": 128, ...}``, ``{"kind": "sparse", "nnz": ...}``, ``bnb_*``).
"""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from odllm.calibration import InputCovariances, LinearStatistics, StopForward, capture_inputs, real_tokens
from odllm.lowrank import LowRankLinear, cholesky_with_jitter, factorize, rank_for_ratio

log = logging.getLogger(__name__)

COMPRESSION_FILE = "compression.json"
RATIO_MEANING = (
    "fraction of each decoder linear's parameters kept: an m x n matrix becomes rank "
    "k = floor(ratio*m*n/(m+n)), k*(m+n) parameters; kept dense when that saves nothing or ratio == 1; "
    "embeddings, lm_head and norms stay dense"
)
WHITENING = {False: "none", True: "cholesky", "asvd": "asvd"}  # LowRank's ``whiten`` choices
ALIGNMENT = (False, "B", "BA")  # LowRank's ``align`` choices: none, refit B, refit both factors


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


def asvd_scaling(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's S = diag(mean|x|^alpha) as a vector; a channel that never fired gets 1e-6 of the largest scale
    (ASVD adds 1e-6) so that S stays invertible, and all-zero statistics give the identity."""
    s = abs_mean.double().clamp(min=0) ** alpha
    top = s.max()
    return torch.ones_like(s) if top <= 0 else s + 1e-6 * top


def _factorise_linear(
    name: str, linear: nn.Linear, C: torch.Tensor, ratio: float, whiten: bool | str,
    abs_mean: torch.Tensor | None = None, alpha: float = 0.5,
):
    """``(LowRankLinear or None when kept dense, report entry, truncated spectrum or None)``.

    ``whiten``: True = Cholesky factor of C (optimal for the output error), "asvd" = diag(mean|x|^alpha),
    False = none. ``predicted_error`` is the sum of dropped sigma^2, i.e. the error the choice minimises:
    output error (whitened), scaled weight error (asvd), weight error (plain).
    """
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
    if whiten == "asvd":
        scaling = torch.diag(asvd_scaling(abs_mean, alpha))
    else:
        scaling = S if whiten else None
    B, A, sigma = factorize(W, scaling, k)
    whitened = sigma if whiten is True else torch.linalg.svdvals(W @ S)
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


def _refit_group(
    original, layer, group: dict[str, LowRankLinear], streams: _Streams, ridge: float, factors: str
) -> dict:
    """Refits the factors of each linear in ``group`` (they share one input) so that B A x' ~ W x.

    Input statistics on the two streams, summed once for the group: C' = sum x' x'^T, K = sum x x'^T,
    C = sum x x^T. Any M = B A then has the exact error E(M) = tr(M C' M^T) - 2 tr(M K^T W^T) + tr(W C W^T).

    - ``factors="B"`` (the paper): A stays, B = W K A^T (A C' A^T + lambda I)^{-1} (ridge least squares);
    - ``factors="BA"``: the best rank-k M for the compressed stream (reduced-rank regression): the
      unconstrained fit W* = W K C'^{-1}, truncated in the C' norm, i.e. ``factorize(W*, chol(C'), k)``,
      the whitened SVD of step 2 again, now on what the layer really sees and aimed at the original output.

    A refit is kept only where E falls. Returns per linear the relative errors and the decision.
    """
    dense = {name: original.get_submodule(name) for name in group}
    n = next(iter(group.values())).in_features
    Cc, K, C = (torch.zeros(n, n, dtype=torch.float64) for _ in range(3))
    first = next(iter(group))
    for x, xc, kw, mask in streams:
        a = capture_inputs(original, x, kw, {first: dense[first]}, mask)[first].double()
        b = capture_inputs(layer, xc, kw, {first: group[first]}, mask)[first].double()
        Cc += b.T @ b
        K += a.T @ b
        C += a.T @ a
    results = {}
    for name, module in group.items():
        W, k = dense[name].weight.double(), module.rank
        energy = ((W @ C) * W).sum().item()
        A = module.A.weight.double()
        if factors == "B":
            G = A @ Cc @ A.T
            L, _ = cholesky_with_jitter(G + ridge * G.trace() / k * torch.eye(k, dtype=G.dtype))
            B = torch.cholesky_solve((W @ K @ A.T).T, L).T
        else:
            S, _ = cholesky_with_jitter(Cc + ridge * Cc.trace() / n * torch.eye(n, dtype=Cc.dtype))
            B, A, _ = factorize(W @ torch.cholesky_solve(K.T, S).T, S, k)
        before, after = (
            ((M @ Cc) * M).sum().item() - 2 * ((M @ K.T) * W).sum().item() + energy
            for M in (module.B.weight.double() @ module.A.weight.double(), B @ A)
        )
        if after < before:
            module.B.weight.copy_(B)
            module.A.weight.copy_(A)
        scale = energy or 1.0
        results[name] = {"error_before": before / scale, "error_refit": after / scale, "refit_kept": after < before}
    return results


def _align_layer(
    original, layer, factorised: dict, groups, entries: dict, streams: _Streams, ridge: float, factors: str
) -> dict:
    """Refits the layer's factorised linears group by group on the compressed stream, undoes them all if the
    layer's output error rose, and advances both streams. Returns the layer's errors and the decision."""
    before = _compare_layers(original, layer, streams)
    saved = {name: copy.deepcopy(module.state_dict()) for name, module in factorised.items()}
    for group in groups:
        members = {name: factorised[name] for name in group if name in factorised}
        if members:
            for name, result in _refit_group(original, layer, members, streams, ridge, factors).items():
                entries[name]["alignment"] = result
    # the original stream moves on here: the decision below does not touch it
    with_refit = _compare_layers(original, layer, streams, advance_original=True)
    kept = with_refit <= before
    if not kept:
        for name, module in factorised.items():
            module.load_state_dict(saved[name])
            entries[name]["alignment"]["refit_kept"] = False
    return {
        "error_before_alignment": before,
        "error_with_refit": with_refit,
        "alignment_kept": kept,
        "output_error": _compare_layers(None, layer, streams, advance_compressed=True),
    }


def is_compressed(module: nn.Module) -> bool:
    """A module written by a compression method (it records its ``kind`` in compression.json)."""
    return hasattr(module, "kind") and callable(getattr(module, "spec", None))


def _storage(roots: Iterable[nn.Module]) -> dict:
    """Numbers represented and bytes really held by the modules under ``roots``; shared tensors count once.

    A compressed module reports its own (``storage()``: packed codes, scales, masks ...), every other module
    its parameters and persistent buffers.
    """
    seen: set[int] = set()
    total = {"params": 0, "bytes": 0}

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if callable(getattr(module, "storage", None)):
            for key, value in module.storage().items():
                total[key] += value
            return
        tensors = [*module.parameters(recurse=False)]
        persistent = [b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        tensors += persistent
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total["params"] += t.numel() if isinstance(t, nn.Parameter) else 0
                total["bytes"] += t.numel() * t.element_size()
        for child in module.children():
            visit(child)

    for root in roots:
        visit(root)
    return total


def _weight_modules(root: nn.Module) -> Iterator[nn.Module]:
    """The outermost linears and compressed modules under ``root``."""
    for child in root.children():
        if is_compressed(child) or isinstance(child, nn.Linear):
            yield child
        else:
            yield from _weight_modules(child)


def _sizes(model: nn.Module, layers: nn.ModuleList) -> dict:
    return {
        "decoder_linear": _storage(_weight_modules(layers)),
        "model": _storage([model]),
    }


def _totals(before: dict, after: dict) -> dict:
    return {
        part: {
            "params_before": before[part]["params"],
            "params_after": after[part]["params"],
            "bytes_before": before[part]["bytes"],
            "bytes_after": after[part]["bytes"],
            "params_kept": after[part]["params"] / before[part]["params"],
            "bytes_kept": after[part]["bytes"] / before[part]["bytes"],
        }
        for part in before
    }


class LayerAlgorithm(Protocol):
    """What :func:`compress_layers` asks of a method.

    ``statistics``: which stream the input statistics come from ("original", "compressed" or "none");
    ``sequential``: whether each layer is measured on, and the next fed by, the compressed stream.
    """

    statistics: str
    sequential: bool

    def settings(self) -> dict: ...

    def validate(self, name: str, linear: nn.Linear) -> None: ...

    def compress_linear(
        self, name: str, linear: nn.Linear, stats: LinearStatistics | None
    ) -> tuple[nn.Module | None, dict]: ...

    def refine(self, original, layer, replaced: dict, groups: list, entries: dict, streams: _Streams) -> dict | None:
        ...


@dataclass
class LowRank:
    """Truncated SVD per linear at ``ratio`` (whitened, ASVD-scaled or plain), optionally aligned."""

    ratio: float
    whiten: bool | str = True
    align: bool | str = "BA"  # false, "B" (the paper: refit B) or "BA" (refit both factors)
    ridge: float = 1e-4
    alpha: float = 0.5  # ASVD's exponent; used only with whiten="asvd"
    spectra: dict = field(default_factory=dict)

    statistics = "original"

    def __post_init__(self) -> None:
        if self.whiten not in WHITENING:
            raise ValueError(f"whiten={self.whiten!r}; choose true (Cholesky), false (none) or 'asvd'")
        if self.align not in ALIGNMENT:
            raise ValueError(f"align={self.align!r}; choose false (none), 'B' (refit B) or 'BA' (refit B and A)")

    @property
    def sequential(self) -> bool:
        return bool(self.align)

    def settings(self) -> dict:
        settings = {"ratio": self.ratio, "ratio_meaning": RATIO_MEANING, "whiten": self.whiten,
                    "align": self.align, "ridge": self.ridge}
        return {**settings, "alpha": self.alpha} if self.whiten == "asvd" else settings

    def validate(self, name: str, linear: nn.Linear) -> None:
        rank_for_ratio(*linear.weight.shape, self.ratio)

    def compress_linear(self, name: str, linear: nn.Linear, stats: LinearStatistics):
        module, entry, spectrum = _factorise_linear(
            name, linear, stats.covariance, self.ratio, self.whiten, stats.abs_mean, self.alpha
        )
        if spectrum is not None:
            self.spectra[name] = spectrum
        return module, entry

    def refine(self, original, layer, replaced, groups, entries, streams) -> dict | None:
        if not self.align:
            return None
        return _align_layer(original, layer, replaced, groups, entries, streams, self.ridge, self.align)


def _entry(name: str, linear: nn.Linear, module: nn.Module | None, found: dict) -> dict:
    """A matrix's report entry: the algorithm's own fields plus name, shape, numbers and bytes before/after."""
    before, after = _storage([linear]), _storage([module if module is not None else linear])
    entry = {"name": name, "shape": list(linear.weight.shape), **found}
    entry.update(params_before=before["params"], params_after=after["params"], bytes_before=before["bytes"],
                 bytes_after=after["bytes"])
    return entry


@torch.no_grad()
def compress_layers(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], algorithm: LayerAlgorithm, *, progress: bool = True
) -> dict:
    """Compress ``model`` in place with ``algorithm``, one decoder layer at a time; returns the report.

    ``batches``: dicts with left-padded ``input_ids`` and ``attention_mask`` ``[B, T]`` (and optionally a
    ``statistics_mask``); pad tokens count nowhere. Every linear's shape is validated before any work.
    """
    layers = decoder_layers(model)
    if any(is_compressed(m) for m in layers.modules()):
        raise ValueError("the model is already compressed: pass the dense model")
    names = {module: name for name, module in model.named_modules()}
    for layer in layers:
        for name, linear in layer.named_modules():
            if isinstance(linear, nn.Linear):
                algorithm.validate(f"{names[layer]}.{name}", linear)
    training = model.training
    model.eval()
    sizes_before = _sizes(model, layers)
    # statistics and errors use only the tokens named by ``statistics_mask`` (default: every non-pad token)
    masks = [batch.get("statistics_mask", batch["attention_mask"]).bool() for batch in batches]
    X, kwargs = _layer_inputs(model, layers, batches)
    streams = _Streams(X, list(X), kwargs, masks)
    matrices, layer_reports = [], []

    for i, layer in enumerate(tqdm(layers, desc="compress layers", disable=not progress)):
        original = copy.deepcopy(layer)
        linears = {name: m for name, m in original.named_modules() if isinstance(m, nn.Linear)}
        stats = None
        if algorithm.statistics != "none":
            source = streams.Xc if algorithm.statistics == "compressed" else streams.X
            with InputCovariances(linears) as stats:
                for x, kw, mask in zip(source, streams.kwargs, streams.masks, strict=True):
                    stats.mask = mask
                    _forward(original, x, kw)

        replaced, entries = {}, {}
        for name, linear in linears.items():
            full_name = f"{names[layer]}.{name}"
            module, found = algorithm.compress_linear(full_name, linear, stats and stats.statistics(name))
            entries[name] = _entry(full_name, linear, module, found)
            if stats is not None:
                entries[name]["tokens"] = stats.tokens[name]
            if module is not None:
                layer.set_submodule(name, module)
                replaced[name] = module
        matrices += entries.values()

        report = {"layer": i, "input_stream": "compressed" if algorithm.sequential else "original"}
        refined = None
        if algorithm.sequential and replaced:
            refined = algorithm.refine(original, layer, replaced, stats.groups if stats else [], entries, streams)
        if refined is not None:
            report.update(refined)
        else:
            if not algorithm.sequential:
                streams.Xc = list(streams.X)  # measure this layer on the original stream
            report["output_error"] = _compare_layers(
                original, layer, streams, advance_original=True, advance_compressed=algorithm.sequential
            )
        layer_reports.append(report)
        log.debug("layer %d: %s", i, report)

    model.train(training)
    return {
        "settings": {
            **algorithm.settings(),
            "calibration_sequences": sum(len(mask) for mask in masks),
            "calibration_tokens": int(sum(mask.sum() for mask in masks)),
        },
        "matrices": matrices,
        "layers": layer_reports,
        "totals": _totals(sizes_before, _sizes(model, layers)),
        "spectra": getattr(algorithm, "spectra", {}),
    }


def compress_model(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    ratio: float,
    whiten: bool | str,
    align: bool,
    ridge: float = 1e-4,
    alpha: float = 0.5,
    progress: bool = True,
) -> dict:
    """Low-rank compression of ``model`` in place; returns a JSON-serialisable report (``report["spectra"]``
    for plots). ``whiten``: True (Cholesky, OD-LLM), False (plain SVD) or "asvd" (``alpha``).

    Without ``align`` only the original stream is needed and each layer's output error is measured on it;
    with ``align`` it is measured on the compressed stream, before and after the refit.
    """
    algorithm = LowRank(ratio=ratio, whiten=whiten, align=align, ridge=ridge, alpha=alpha)
    return compress_layers(model, batches, algorithm, progress=progress)


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
    matrix = {True: "W S (whitened)", "asvd": "W diag(mean|x|^alpha) (ASVD)"}.get(settings["whiten"], "W")
    fig.suptitle(
        f"singular values of {matrix}, ratio={settings['ratio']}: "
        "dot = kept rank, colour = layer (dark = first)"
    )
    fig.savefig(path, dpi=120)
    return Path(path)


def compression_specs(model: nn.Module) -> dict[str, dict]:
    """Every compressed module's spec (its kind and what rebuilding its shapes needs), keyed by module name."""
    return {name: m.spec() for name, m in model.named_modules() if is_compressed(m)}


def save_compression_config(model: nn.Module, directory: str | Path) -> Path:
    """Writes ``compression.json``: per compressed module its spec; a low-rank module as its bare rank."""
    specs = {
        name: spec["rank"] if spec["kind"] == "lowrank" else spec for name, spec in compression_specs(model).items()
    }
    path = Path(directory) / COMPRESSION_FILE
    path.write_text(json.dumps(specs, indent=2))
    return path


MODULE_KINDS = ("lowrank", "gptq", "rtn", "sparse", "bnb_int8", "bnb_nf4", "quant_embedding", "quant_head",
                "tied_head")


def module_class(kind: str) -> type:
    """The module class of a compression.json ``kind``; it rebuilds empty shapes with ``empty(linear, spec)``.
    bitsandbytes is imported only when a saved model uses it."""
    if kind == "lowrank":
        return LowRankLinear
    if kind in ("gptq", "rtn"):
        from odllm.quantization import QuantLinear

        return QuantLinear
    if kind in ("quant_embedding", "quant_head", "tied_head"):
        from odllm import embeddings

        return {"quant_embedding": embeddings.QuantEmbedding, "quant_head": embeddings.QuantHead,
                "tied_head": embeddings.TiedHead}[kind]
    if kind == "sparse":
        from odllm.sparse import SparseLinear

        return SparseLinear
    if kind in ("bnb_int8", "bnb_nf4"):
        from odllm.bnb import Int8Linear, NF4Linear

        return Int8Linear if kind == "bnb_int8" else NF4Linear
    raise ValueError(f"{COMPRESSION_FILE} names an unknown module kind {kind!r}; known kinds: {list(MODULE_KINDS)}")


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
    """The model saved in ``directory``: compressed modules where compression.json says, else a plain HF model."""
    directory = Path(directory)
    if not (directory / COMPRESSION_FILE).exists():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    entries = json.loads((directory / COMPRESSION_FILE).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
    # a bare integer is a low-rank module's rank; parents are rebuilt before modules nested in them
    for name, spec in sorted(entries.items(), key=lambda item: item[0].count(".")):
        spec = {"kind": "lowrank", "rank": spec} if isinstance(spec, int) else spec
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear | nn.Embedding):
            raise ValueError(f"{COMPRESSION_FILE} names {name}, a {type(linear).__name__}, not a Linear or Embedding")
        model.set_submodule(name, module_class(spec["kind"]).empty(linear, spec))
    for module in model.modules():  # a module that uses another one (the tied int8 head) finds it now
        if callable(getattr(module, "bind", None)):
            module.bind(model)
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
