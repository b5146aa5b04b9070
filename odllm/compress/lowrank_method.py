"""The low-rank method family: odllm (OD-LLM), svd, svd_whiten, svd_align, asvd, odllm_b, odllm_int8, odllm_gptq4/8.

OD-LLM (:class:`LowRank`), per decoder layer i:

1. run the original layer i on the original stream X_i; hooks sum C = sum x x^T per linear (non-pad tokens);
2. factorise each linear at the rank its share ``ratio`` of parameters allows (:mod:`odllm.compress.lowrank`),
   whitened by the Cholesky factor of C, scaled by ASVD's diag(mean|x|^alpha), or plain;
3. with ``align``: refit the factors on the compressed stream (:mod:`odllm.compress.align`);
4. advance: X_{i+1} = layer_i(X_i), X'_{i+1} = compressed layer_i(X'_i) (:mod:`odllm.compress.driver`).

``ratio`` is the fraction of each decoder linear's parameters kept: a factorised m x n matrix of rank
k = floor(ratio m n / (m + n)) stores k (m + n) <= ratio m n numbers. Embeddings, lm_head and norms stay
dense; the report gives decoder-only and whole-model sizes, in numbers and in the bytes really held.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from odllm.compress.align import BLOCK, align_layer
from odllm.compress.allocation import IMPORTANCE, choose_ranks
from odllm.compress.driver import Streams, compare_layers, compress_layers
from odllm.compress.grid import check_bits
from odllm.compress.lowrank import (
    CholeskyInPlace,
    LowRankLinear,
    factorize,
    rank_for_ratio,
    singular_values,
)
from odllm.compress.statistics import LinearStatistics, capture_inputs, product
from odllm.compress.storage import storage

log = logging.getLogger(__name__)

RATIO_MEANING = (
    "fraction of each decoder linear's parameters kept: an m x n matrix becomes rank "
    "k = floor(ratio*m*n/(m+n)), k*(m+n) parameters; kept dense when that saves nothing or ratio == 1; "
    "embeddings, lm_head and norms stay dense"
)

ALLOCATION = ("uniform", "loss")  # LowRank's ``allocation`` choices (odllm.compress.allocation)

WHITENING = {False: "none", True: "cholesky", "asvd": "asvd"}  # LowRank's ``whiten`` choices

ALIGNMENT = (False, "B", "BA")  # LowRank's ``align`` choices: none, refit B, refit both factors


def asvd_scaling(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's S = diag(mean|x|^alpha) as a vector; a channel that never fired gets 1e-6 of the largest scale
    (ASVD adds 1e-6) so that S stays invertible, and all-zero statistics give the identity."""
    s = abs_mean.double().clamp(min=0) ** alpha
    top = s.max()
    return torch.ones_like(s) if top <= 0 else s + 1e-6 * top


def residual_rows(W: torch.Tensor, module: LowRankLinear, rows: int = BLOCK):
    """W - B A in float64, ``rows`` rows at a time (the factors as stored, a column block of A converted at a time)."""
    A = module.A.weight
    for r in range(0, W.shape[0], rows):
        D = W[r : r + rows].to(torch.float64, copy=True)  # a copy even when W is float64
        B = module.B.weight[r : r + rows].double()
        for j in range(0, D.shape[1], BLOCK):
            D[:, j : j + BLOCK].addmm_(B, A[:, j : j + BLOCK].double(), alpha=-1)
        yield D


USE_RATIO = "ratio"  # factorise_linear's default ``rank``: the one ``ratio`` gives


def factorise_linear(
    name: str, linear: nn.Linear, C: torch.Tensor, ratio: float, whiten: bool | str,
    abs_mean: torch.Tensor | None = None, alpha: float = 0.5, rank: int | None | str = USE_RATIO,
):
    """``(LowRankLinear or None when kept dense, report entry, truncated spectrum or None)``.

    ``whiten``: True = Cholesky factor of C (optimal for the output error), "asvd" = diag(mean|x|^alpha),
    False = none. ``predicted_error`` is the sum of dropped sigma^2, i.e. the error the choice minimises:
    output error (whitened), scaled weight error (asvd), weight error (plain). ``rank``: an allocated rank
    (None = keep dense) instead of the one ``ratio`` gives.
    """
    m, n = linear.weight.shape
    params = sum(p.numel() for p in linear.parameters())
    entry = {"name": name, "shape": [m, n], "rank": "dense", "params_before": params, "params_after": params}
    k = rank_for_ratio(m, n, ratio) if rank == USE_RATIO else rank
    if k is not None and not 1 <= k <= min(m, n):
        raise ValueError(f"{name}: rank {k} is outside [1, min(m, n) = {min(m, n)}] for a {m}x{n} matrix")
    if k is None or k * (m + n) >= m * n:
        return None, entry, None
    # memory: C's own buffer holds S = chol(C) until restore() gives C back (one n x n matrix, 0.5 GiB at width
    # 8192), and both error terms need only S: tr(D C D^T) = ||D S||_F^2 - jitter ||D||_F^2, the same for W
    S = CholeskyInPlace(C)
    try:
        jitter = S.jitter
        if jitter:
            log.info("%s: input covariance is singular, added jitter %.3g * I before Cholesky", name, jitter)
        W = linear.weight.detach()  # read in column blocks by S's methods: no float64 copy of W is held
        if whiten == "asvd":
            scaling = torch.diag(asvd_scaling(abs_mean, alpha))
        else:
            scaling = S if whiten else None
        B, A, sigma = factorize(W, scaling, k)
        whitened = sigma if whiten is True else singular_values(S.right(W))
        module = LowRankLinear.from_factors(B.to(W.dtype), A.to(W.dtype), linear.bias)
        del B, A  # float64; the module holds the factors as stored
        energy = S.quadratic(W)
        error = sum(S.quadratic(rows) for rows in residual_rows(W, module))
    finally:
        S.restore()
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


def factor_storage(bits: int, group_size: int, symmetric: bool, quantizer: str = "rtn") -> str:
    """How integer factors are stored, in the words odllm.json records (also for factors rounded after the fact)."""
    grid = "row" if group_size == -1 else f"group of up to {group_size} columns"
    grid = f"symmetric {grid}" if symmetric else grid
    how = "" if quantizer == "rtn" else "GPTQ, "
    return f"int{bits} low-rank factors ({how}codes + float16 scale and zero point per {grid})"


@dataclass
class LowRank:
    """Truncated SVD per linear at ``ratio`` (whitened, ASVD-scaled or plain), optionally aligned.

    ``allocation="loss"``: :meth:`allocate` (a pre-pass over the dense model, before ``compress_layers``) shares
    the uniform ratio's parameter total out by whitened truncation loss (:mod:`odllm.compress.allocation`);
    ``ranks`` then holds the rank of each matrix by full name (None = kept dense).
    """

    ratio: float
    whiten: bool | str = True
    align: bool | str = "BA"  # false, "B" (the paper: refit B) or "BA" (refit both factors)
    ridge: float = 1e-4
    alpha: float = 0.5  # ASVD's exponent; used only with whiten="asvd"
    allocation: str = "uniform"  # uniform: every matrix at ``ratio``; loss: ranks by loss per parameter
    importance: str = "kl"  # allocation=loss: each matrix's loss weight (kl, energy, none; see allocation.py)
    sensitivity_prompts: int = 64  # importance=kl: calibration prompts the per-matrix KL is measured on
    ranks: dict | None = None  # per-matrix ranks by full name (None = dense); None = the uniform ratio
    spectra: dict = field(default_factory=dict)
    allocation_report: dict = field(default_factory=dict, init=False)

    statistics = "original"

    def __post_init__(self) -> None:
        if self.whiten not in WHITENING:
            raise ValueError(f"whiten={self.whiten!r}; choose true (Cholesky), false (none) or 'asvd'")
        if self.align not in ALIGNMENT:
            raise ValueError(f"align={self.align!r}; choose false (none), 'B' (refit B) or 'BA' (refit B and A)")
        if self.allocation not in ALLOCATION:
            raise ValueError(f"allocation={self.allocation!r}; choose one of {list(ALLOCATION)}")
        if self.allocation == "loss" and self.whiten is not True:
            raise ValueError("allocation=loss shares ranks by whitened truncation loss: it needs whiten=true")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance={self.importance!r}; choose one of {list(IMPORTANCE)}")

    def allocate(self, model: nn.Module, batches: list[dict]) -> None:
        """allocation=loss: choose ``ranks`` from the dense ``model`` and the calibration ``batches`` (call it
        before ``compress_layers``); allocation=uniform: nothing."""
        if self.allocation != "loss":
            return
        self.ranks, self.allocation_report = choose_ranks(
            model, batches, self.ratio, self.importance, self.sensitivity_prompts
        )

    @property
    def sequential(self) -> bool:
        return bool(self.align)

    def settings(self) -> dict:
        settings = {"ratio": self.ratio, "ratio_meaning": RATIO_MEANING, "whiten": self.whiten,
                    "align": self.align, "ridge": self.ridge}
        if self.allocation != "uniform":  # uniform runs keep the report they always had
            settings["allocation"] = self.allocation_report or {"rule": self.allocation}
        return {**settings, "alpha": self.alpha} if self.whiten == "asvd" else settings

    def validate(self, name: str, linear: nn.Linear) -> None:
        rank_for_ratio(*linear.weight.shape, self.ratio)
        if self.ranks is not None and name not in self.ranks:
            raise ValueError(f"no allocated rank for {name}: the ranks were chosen on another model")

    def compress_linear(self, name: str, linear: nn.Linear, stats: LinearStatistics):
        if self.allocation == "loss" and self.ranks is None:
            raise RuntimeError("allocation=loss: call LowRank.allocate(model, batches) before compress_layers")
        rank = USE_RATIO if self.ranks is None else self.ranks[name]
        module, entry, spectrum = factorise_linear(
            name, linear, stats.covariance, self.ratio, self.whiten, stats.abs_mean, self.alpha, rank
        )
        if spectrum is not None:
            self.spectra[name] = spectrum
        return module, entry

    def refine(self, original, layer, replaced, groups, entries, streams) -> dict | None:
        if not self.align:
            return None
        return align_layer(original, layer, replaced, groups, entries, streams, self.ridge, self.align)


FACTOR_QUANTIZERS = ("rtn", "gptq")  # QuantizedLowRank's ``factor_quantizer`` choices


@dataclasses.dataclass
class QuantizedLowRank(LowRank):
    """odllm + integer factors (beyond the paper): :class:`LowRank`, then each factor stored as ``factor_bits``-bit
    integers on min-max grids per row or per group of ``factor_group_size`` columns (clipped to the factor's width,
    ``odllm.compress.lowrank.factor_group_size``), chosen by round-to-nearest (``factor_quantizer=rtn``,
    ``LowRankLinear.quantize_factors``) or by GPTQ (``gptq``, ``LowRankLinear.gptq_factors``: A against the input
    covariance C', B refit on Â and then against Â C' Â^T).

    A layer's factors are quantized once they are final (after its alignment) and before the compressed stream
    moves on, so layer i+1 is aligned to what the quantized layers 0..i really produce. With GPTQ the layer's input
    groups ([q,k,v], [o], [gate,up], [down]) go in order, each group's C' and K = sum x x'^T summed on the layer
    with the earlier groups already quantized (true-sequential, as GPTQ's own loop).
    """

    factor_bits: int = 8
    factor_group_size: int = -1  # -1 = one grid per row
    factor_quantizer: str = "rtn"
    factor_damp: float = 0.01  # gptq: damping of H, relative to its mean diagonal
    factor_act_order: bool = True  # gptq: columns by decreasing H_jj
    factor_symmetric: bool = False  # zero-centred grids: the int8 kernel needs no correction term (quant.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.factor_bits)
        if self.factor_quantizer not in FACTOR_QUANTIZERS:
            raise ValueError(f"factor_quantizer={self.factor_quantizer!r}; choose one of {list(FACTOR_QUANTIZERS)}")
        if self.factor_group_size != -1 and self.factor_group_size < 1:
            raise ValueError(f"factor_group_size={self.factor_group_size}; use a number of columns >= 1 or -1 (row)")

    def settings(self) -> dict:
        storage = factor_storage(self.factor_bits, self.factor_group_size, self.factor_symmetric, self.factor_quantizer)
        settings = {**super().settings(), "factor_bits": self.factor_bits, "storage": storage}
        if (self.factor_quantizer, self.factor_group_size) != ("rtn", -1):  # odllm_int8 keeps its report
            settings.update(factor_group_size=self.factor_group_size, factor_quantizer=self.factor_quantizer)
            if self.factor_quantizer == "gptq":
                settings.update(factor_damp=self.factor_damp, factor_act_order=self.factor_act_order)
        if self.factor_symmetric:
            settings.update(factor_symmetric=True)
        return settings

    def _quantize(self, module: LowRankLinear, W: torch.Tensor, Cc, tokens, K=None, C=None) -> dict | None:
        if self.factor_quantizer == "rtn":
            module.quantize_factors(self.factor_bits, self.factor_group_size, self.factor_symmetric)
            return None
        return module.gptq_factors(W, Cc, tokens, K=K, C=C, bits=self.factor_bits, group_size=self.factor_group_size,
                                   damp=self.factor_damp, act_order=self.factor_act_order, ridge=self.ridge,
                                   symmetric=self.factor_symmetric)

    def compress_linear(self, name, linear, stats):
        module, entry = super().compress_linear(name, linear, stats)
        if module is not None and not self.sequential:  # no alignment follows: the factors are final
            found = self._quantize(module, linear.weight, stats.covariance, stats.tokens)
            if found is not None:
                entry["factor_quantization"] = found
        return module, entry

    def refine(self, original, layer, replaced, groups, entries, streams) -> dict:
        # the layer's inputs on both streams: the refit advances them with float factors
        inputs, originals = list(streams.Xc), list(streams.X)
        report = super().refine(original, layer, replaced, groups, entries, streams)
        if self.factor_quantizer == "rtn":
            for module in replaced.values():
                module.quantize_factors(self.factor_bits, self.factor_group_size, self.factor_symmetric)
        else:
            before = Streams(originals, inputs, streams.kwargs, streams.masks)
            for group in groups:  # in call order: each group's statistics with the earlier groups quantized
                members = {name: replaced[name] for name in group if name in replaced}
                if members:
                    for name, found in self._quantize_group(original, layer, members, before).items():
                        entries[name]["factor_quantization"] = found
        for name, module in replaced.items():
            entries[name]["bytes_after"] = storage([module])["bytes"]
        redo = Streams(streams.X, inputs, streams.kwargs, streams.masks)  # X already holds the original outputs
        report["output_error_float_factors"] = report["output_error"]
        report["output_error"] = compare_layers(None, layer, redo, advance_compressed=True)
        streams.Xc = redo.Xc
        return report

    def _quantize_group(self, original, layer, members: dict, streams: Streams) -> dict:
        """GPTQ of the factors of ``members`` (linears sharing one input) from C' = sum x'x'^T (the compressed
        stream through ``layer``), K = sum x x'^T and C = sum x x^T (x: the dense input through ``original``)."""
        first = next(iter(members))
        dense = original.get_submodule(first)
        n = dense.in_features
        Cc, K, C = (torch.zeros(n, n, dtype=torch.float64, device=dense.weight.device) for _ in range(3))
        tokens = 0
        for x, xc, kw, mask in streams:
            a = capture_inputs(original, x, kw, {first: dense}, mask)[first]
            b = capture_inputs(layer, xc, kw, {first: members[first]}, mask)[first]
            Cc += product(b, b)
            K += product(a, b)
            C += product(a, a)
            tokens += len(b)
        return {name: self._quantize(module, original.get_submodule(name).weight, Cc, tokens, K, C)
                for name, module in members.items()}


def compress_model(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    ratio: float,
    whiten: bool | str,
    align: bool,
    ridge: float = 1e-4,
    alpha: float = 0.5,
    allocation: str = "uniform",
    importance: str = "kl",
    progress: bool = True,
) -> dict:
    """Low-rank compression of ``model`` in place; returns a JSON-serialisable report (``report["spectra"]``
    for plots). ``whiten``: True (Cholesky, OD-LLM), False (plain SVD) or "asvd" (``alpha``).

    Without ``align`` only the original stream is needed and each layer's output error is measured on it;
    with ``align`` it is measured on the compressed stream, before and after the refit.
    """
    algorithm = LowRank(ratio=ratio, whiten=whiten, align=align, ridge=ridge, alpha=alpha, allocation=allocation,
                        importance=importance)
    algorithm.allocate(model, batches)
    return compress_layers(model, batches, algorithm, progress=progress)
