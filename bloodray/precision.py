"""Which floating-point precision a trainer runs in, chosen at run time for the machine it lands on.

``train.precision`` of ``bloodray train`` and ``precision`` of the pack trainer take ``auto``, ``fp32`` or
``bf16``; both trainers resolve it here, once per process, with :func:`resolve_precision`:

* ``fp32``: plain float32, everywhere.
* ``bf16``: bfloat16 autocast (weights, optimizer state and the loss stay float32). On a CPU it needs native bf16
  arithmetic (``amx_bf16`` or ``avx512_bf16`` in the CPU flags): without it oneDNN emulates bf16 and runs slower
  than fp32, so the trainer falls back to fp32 and says why. On a GPU it needs ``torch.cuda.is_bf16_supported()``.
* ``auto``: bf16 where the device has it natively, else fp32.

Whatever is asked, bf16 is used only after a self-check passes: one small convolutional forward and backward pass
under autocast must run and give finite values within :data:`SELF_CHECK_TOLERANCE` of the same pass in float32.
A failure falls back to fp32 and the reason is logged and returned (trainers record it in their metrics).

Machines differ (developers have had both AMD EPYC, avx512_bf16 without AMX, and Intel Xeon with AMX), so nothing
here assumes either; :func:`cpu_bf16_flags` reads what the CPU reports.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: The values of ``train.precision`` (and of the pack trainer's ``precision``).
PRECISIONS = ("auto", "fp32", "bf16")
#: CPU flags (``/proc/cpuinfo``) that mean native bf16 arithmetic, fastest first.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: Largest relative difference (of the logits and of the weight gradient, to float32) the self-check accepts.
#: bf16 keeps 8 significant bits (~0.4 % per rounding); a few roundings through a small net stay well inside 10 %.
SELF_CHECK_TOLERANCE = 0.1


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``fp32`` or ``bf16`` on one device type, and why it was chosen."""

    name: str
    device_type: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of a training or evaluation step (a no-op for fp32)."""
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.name, "precision_reason": self.reason}


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 flags of this CPU (:data:`BF16_CPU_FLAGS` found in ``/proc/cpuinfo``); empty when none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in BF16_CPU_FLAGS if f in flags]
    except OSError:  # not Linux: no way to tell, so no native bf16 is assumed
        pass
    return []


def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` (``cpu`` or ``cuda``) does bf16 natively, and a short reason."""
    import torch

    if device_type == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return ok, ("the GPU supports bf16" if ok else "the GPU has no bf16 support")
    flags = cpu_bf16_flags()
    if not flags:
        return False, "the CPU has no native bf16 (neither amx_bf16 nor avx512_bf16 in its flags)"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn), which runs bf16 on CPUs"
    return True, f"the CPU has {flags[0]}"


def self_check(device_type: str) -> str | None:
    """Run one small conv net forward and backward in bf16 and fp32; None when they agree, else what went wrong."""
    import torch
    from torch import nn

    try:
        gen = torch.Generator().manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        net = net.to(device_type).to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 16, 16, generator=gen).to(device_type).contiguous(memory_format=torch.channels_last)
        results = []
        for autocast in (contextlib.nullcontext(), torch.autocast(device_type, dtype=torch.bfloat16)):
            net.zero_grad(set_to_none=True)
            with autocast:
                logits = net(x)
            logits.float().square().mean().backward()
            results.append((logits.detach().float(), net[0].weight.grad.detach().float()))
        (ref_logits, ref_grad), (logits, grad) = results
        if logits.dtype != torch.float32 or not (torch.isfinite(logits).all() and torch.isfinite(grad).all()):
            return "bf16 gave non-finite values"
        for what, ref, got in (("logits", ref_logits, logits), ("gradients", ref_grad, grad)):
            diff = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
            if diff > SELF_CHECK_TOLERANCE:
                return f"bf16 {what} differ from fp32 by {diff:.3f} (tolerance {SELF_CHECK_TOLERANCE})"
    except Exception as exc:  # noqa: BLE001 - any failure of the bf16 path means: do not use it
        return f"bf16 failed its self-check ({type(exc).__name__}: {exc})"
    return None


def resolve_precision(requested: str, device_type: str) -> Precision:
    """The precision a trainer runs in on ``device_type`` for the configured ``requested`` (module docstring).

    Never raises for a machine that cannot do bf16: it falls back to fp32 and logs the reason.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {requested!r})")
    if requested == "fp32":
        return Precision("fp32", device_type, "fp32 requested")
    ok, why = native_bf16(device_type)
    if not ok:
        if requested == "bf16":
            log.warning("precision bf16 requested but %s; training in fp32", why)
        return Precision("fp32", device_type, f"{why}: fp32")
    failure = self_check(device_type)
    if failure is not None:
        log.warning("%s; training in fp32", failure)
        return Precision("fp32", device_type, f"{failure}: fp32")
    return Precision("bf16", device_type, f"{why}; bf16 self-check passed")
