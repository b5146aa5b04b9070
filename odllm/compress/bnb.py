"""bitsandbytes baselines: decoder linears replaced by ``Linear8bitLt`` (LLM.int8()) or ``Linear4bit`` (NF4).

Both are data-free (no calibration): int8 keeps one int8 per weight and one float32 absmax per row; NF4 keeps
two 4-bit codes per byte and one float32 absmax per block of ``blocksize`` weights (plus, with
``double_quant``, those absmax quantized again). On this CPU (bitsandbytes >= 0.45) both run natively:
int8 through ``torch._int_mm`` (activations cast to float16 and quantized per row on the fly), NF4 through
bitsandbytes' CPU kernels. Three defects of bitsandbytes 0.50.2 on this CPU are worked around in
:class:`NF4Linear` (each found here, each covered by a test):

- its native CPU NF4 dequantization assumes in_features % blocksize == 0: the codes are quantized in blocks of
  the flattened weight but dequantized in blocks of rows, so llama-small's down_proj (688 = 10.75 x 64 columns)
  comes back with 58 % relative error instead of 9 %. Such matrices dequantize with bitsandbytes' own
  pure-torch reference routine and multiply in float32;
- on a CPU with AVX512-BF16, Linear4bit repacks its weights at the first inference forward into a faster
  layout (absmax in bfloat16), which crashes unless in_features % blocksize == 0 and out_features % 32 == 0
  (llama-small's gate/up/down fail): the repacking is switched off for those shapes;
- saving a repacked layer unpacks the weight but leaves the absmax transposed in bfloat16, which corrupts the
  file and the live layer: :meth:`NF4Linear._save_to_state_dict` restores it before bitsandbytes saves.

bitsandbytes' own ``load_state_dict`` cannot restore these layers on a CPU (Linear8bitLt asks for
``.cuda()`` first, Linear4bit refuses the packed shape), so the two subclasses below rebuild themselves
from the saved tensors; saving uses bitsandbytes' own ``state_dict``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_blockwise
    from bitsandbytes.nn import Int8Params, Params4bit
except Exception as error:  # noqa: BLE001 - any import failure means the same thing here
    raise ImportError(
        f"the bnb_int8 / bnb_nf4 methods need bitsandbytes with CPU support; written and tested against "
        f"bitsandbytes 0.50.2 (pip install 'bitsandbytes==0.50.2'), which uses some of its internals: {error}"
    ) from error

PACK_ROWS = 32  # bitsandbytes' CPU repacking works on blocks of 32 output rows



def _load_bias(module: nn.Module, state_dict: dict, prefix: str, missing: list) -> None:
    """The bias of a rebuilt bitsandbytes layer, frozen like its quantized weight."""
    if module.bias is not None:
        if prefix + "bias" not in state_dict:
            missing.append(prefix + "bias")
            return
        module.bias = nn.Parameter(state_dict[prefix + "bias"].clone(), requires_grad=False)


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs the float32 -> float16 input cast at every int8 forward; it is documented above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastNotice())


def _tensor_bytes(tensors) -> int:
    unique = {id(t): t for t in tensors if t is not None}.values()
    return sum(t.numel() * t.element_size() for t in unique)


class Int8Linear(bnb.nn.Linear8bitLt):
    """Linear8bitLt that reports its kind and storage and loads from a saved state on the CPU."""

    kind = "bnb_int8"

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     has_fp16_weights=False, threshold=threshold)
        module.weight = Int8Params(linear.weight.detach().clone().float(), requires_grad=False,
                                   has_fp16_weights=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module.to("cpu")  # quantizes: row-wise absmax int8

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> Int8Linear:
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   has_fp16_weights=False, threshold=spec.get("threshold", 6.0))

    def spec(self) -> dict:
        return {"kind": self.kind, "threshold": self.state.threshold}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        weight, scb = state_dict.get(prefix + "weight"), state_dict.get(prefix + "SCB")
        if weight is None or scb is None:
            missing += [prefix + key for key, value in (("weight", weight), ("SCB", scb)) if value is None]
            return
        weight = weight.clone()
        self.weight = Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb.clone())
        _load_bias(self, state_dict, prefix, missing)

    def storage(self) -> dict:
        scb = self.weight.SCB if getattr(self.weight, "SCB", None) is not None else self.state.SCB
        return {"params": self.weight.numel() + (self.bias.numel() if self.bias is not None else 0),
                "bytes": _tensor_bytes([self.weight.data, scb, self.bias])}


class NF4Linear(bnb.nn.Linear4bit):
    """Linear4bit (NF4) that reports its kind and storage and loads from a saved state on the CPU."""

    kind = "bnb_nf4"

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> NF4Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
        module.weight = Params4bit(linear.weight.detach().clone().float(), requires_grad=False, blocksize=blocksize,
                                   compress_statistics=double_quant, quant_type="nf4", module=module)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module.to("cpu")._check_fast_path(blocksize)  # quantizes: NF4 codes + absmax per block

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> NF4Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     compute_dtype=torch.float32, compress_statistics=spec.get("double_quant", False),
                     quant_type="nf4")
        return module._check_fast_path(spec.get("blocksize", 64))

    def _check_fast_path(self, blocksize: int) -> NF4Linear:
        """Use bitsandbytes' native kernels only where they are right: rows made of whole blocks, and for the
        AVX512-BF16 repacking also whole blocks of 32 output rows."""
        self.native_kernels = self.in_features % blocksize == 0
        fits = self.native_kernels and self.out_features % PACK_ROWS == 0
        self.support_avx512bf16_for_cpu = bool(self.support_avx512bf16_for_cpu and fits)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight by bitsandbytes' reference (pure torch) dequantization of the flattened blocks."""
        state = self.weight.quant_state
        absmax = state.absmax
        if state.nested:
            absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        return _dequantize_4bit_compute(self.weight.data.reshape(-1), absmax.float(), state.code, state.blocksize,
                                        state.shape, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_kernels:
            return super().forward(x)
        return F.linear(x.float(), self.dequantized_weight(), self.bias).to(x.dtype)

    def spec(self) -> dict:
        state = self.weight.quant_state
        return {"kind": self.kind, "blocksize": state.blocksize, "double_quant": bool(state.nested)}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        state = getattr(self.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False) and not state.original_nested:
            # undo the CPU repacking here: bitsandbytes' inverse restores the weight but not the absmax
            self.weight.data, state = _convert_weight_packed_for_cpu_inverse(self.weight.data, state)
            state.absmax = state.absmax.T.reshape(-1).float()  # [K/block, N] bfloat16 -> row-major float32
            self.weight.quant_state = state
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        if key not in state_dict or not stats:
            missing.append(key)
            return
        self.weight = Params4bit.from_prequantized(state_dict[key].clone(), stats, requires_grad=False,
                                                   device="cpu", module=self)
        _load_bias(self, state_dict, prefix, missing)

    def storage(self) -> dict:
        state = self.weight.quant_state
        tensors = [self.weight.data, state.absmax, state.code, self.bias]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        m, n = state.shape
        return {"params": m * n + (self.bias.numel() if self.bias is not None else 0), "bytes": _tensor_bytes(tensors)}


@dataclass
class BitsAndBytes:
    """The per-layer replacement for ``odllm.compress.driver.compress_layers``; it needs no calibration statistics
    (the driver still measures each layer's output error on the quantized stream)."""

    quant_type: str = "int8"  # int8 | nf4
    threshold: float = 6.0  # int8: LLM.int8() outlier threshold on activations (0 = all int8)
    blocksize: int = 64  # nf4: weights per absmax
    double_quant: bool = False  # nf4: quantize the absmax too

    statistics = "none"
    sequential = True

    def settings(self) -> dict:
        return {"algorithm": "bnb", **asdict(self), "bitsandbytes": bnb.__version__,
                "storage": "bitsandbytes layers (their own packed formats)"}

    def validate(self, name: str, linear: nn.Linear) -> None:
        if self.quant_type not in ("int8", "nf4"):
            raise ValueError(f"quant_type={self.quant_type!r}; choose 'int8' or 'nf4'")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"{name} is on {linear.weight.device}; the bnb methods here run on the CPU only: "
                             "pass device=cpu")

    def compress_linear(self, name: str, linear: nn.Linear, stats) -> tuple[nn.Module, dict]:
        if self.quant_type == "int8":
            module = Int8Linear.from_linear(linear, self.threshold)
        else:
            module = NF4Linear.from_linear(linear, self.blocksize, self.double_quant)
        return module, {"kind": module.kind}

    def refine(self, *args) -> None:
        return None
