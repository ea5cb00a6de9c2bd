"""Where and how a step computes: the device (:func:`resolve_device`), precision, memory
format and the cuDNN settings.

One place decides these so that training, validation, evaluation and prediction agree.
The choices and their defaults come from `runtime.precision`, `runtime.channels_last` and
`runtime.cudnn_benchmark`:

- ``tf32``: float32 tensors, TensorFloat-32 tensor-core math in convolutions and matrix
  products on a GPU (10-bit mantissa inputs, float32 accumulation). On a CPU: float32.
- ``fp32``: strict float32 everywhere (TF32 off), for checking the others against.
- ``bf16``: bfloat16 autocast. No loss scaling is needed (float32's exponent range).
- ``fp16``: float16 autocast with dynamic loss scaling (a GradScaler, whose state is
  saved in ``last.pt`` so that a resumed run scales as an uninterrupted one would; it
  reads an overflow flag back from the device every step).

On a CPU every precision is honoured as written; the default tf32 is plain float32 there.
fp16 autocast is slow on CPUs, and so is bf16 unless the CPU has bf16 instructions
(AVX512-BF16 or AMX): there ``--set runtime.precision=bf16`` ran `predict` with CAM 1.3x
faster than float32 on 2 cores, its probabilities within about 5e-3 of float32's.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from volttl.config import ConfigError

log = logging.getLogger("volttl.numerics")

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Numerics:
    """The numeric settings of a step; ``Numerics.of(cfg.runtime)`` reads a config's."""

    precision: str = "tf32"
    channels_last: bool = True
    cudnn_benchmark: bool = True

    @classmethod
    def of(cls, train_config) -> Numerics:
        return cls(train_config.precision, train_config.channels_last, train_config.cudnn_benchmark)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The autocast context of a forward pass (disabled for tf32 and fp32)."""
        dtype = _AUTOCAST.get(self.precision)
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16; a disabled scaler (a no-op) otherwise."""
        return torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    def configure(self, device: torch.device) -> None:
        """Set the process-wide cuDNN and TF32 switches this step needs on ``device``."""
        if device.type != "cuda":
            if self.precision in _AUTOCAST and not (self.precision == "bf16" and cpu_has_bf16(device)):
                log.warning("runtime.precision %s on a %s: autocast there is slow on this processor "
                            "(tf32, the default, is plain float32 there)", self.precision, device.type)
            return
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        tf32 = self.precision != "fp32"  # under autocast, TF32 only touches float32 leftovers
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        if hasattr(cudnn, "fp32_precision"):  # torch >= 2.9: the legacy flags must not be mixed in
            matmul.fp32_precision = cudnn.fp32_precision = "tf32" if tf32 else "ieee"
        else:
            matmul.allow_tf32 = cudnn.allow_tf32 = tf32

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the memory format the model runs in."""
        return x.contiguous(memory_format=self.memory_format)


DEFAULT_NUMERICS = Numerics()


def cpu_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CPU with bf16 instructions oneDNN uses (AVX512-BF16, AMX)."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: assume not
        return False


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; a device that
    is not there is a one-line error rather than a failure deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"runtime.device '{name}' is not a device (use auto, cpu, cuda or cuda:N)"
                          ) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device '{name}': no CUDA GPU is available on this machine "
                              "(use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    return device
