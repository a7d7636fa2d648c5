"""OpenVINO as the CPU runtime of :class:`bloodray.predict.CellPredictor` (``inference.runtime: openvino``).

Measured on the packaged model (``bench/runtimes.py``, BENCHMARKS.md; AMD EPYC, one thread, forward only,
interleaved, loaded machine): through the predictor, OOD features included, OpenVINO bf16 ran at 1.29x torch's
bf16 autocast as the job runs it, with fp32's class on 99.95 % of the PBC test split, like torch bf16. The model
is converted once per process (7-9 s under load) with the OOD features as extra outputs, so the OOD score needs
no torch forward pass; the chosen precision still passes the checkpoint's self-check before it is used
(:mod:`bloodray.inference_precision`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

#: ``inference.runtime`` values: torch's own CPU path, or OpenVINO (CPU only; GPUs always run torch).
RUNTIMES = ("torch", "openvino")
#: OpenVINO's name of each precision (its ``INFERENCE_PRECISION_HINT``).
_HINT = {"fp32": "f32", "bf16": "bf16"}


def explicit_padding(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose ``padding='same'`` convolutions carry the equivalent numbers (same arithmetic):
    converters match the plain convolution operator, not its ``'same'`` overload."""
    model = copy.deepcopy(model).eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.padding == "same":
            mod.padding = tuple((k - 1) // 2 * d for k, d in zip(mod.kernel_size, mod.dilation))
    return model


class _WithFeatures(torch.nn.Module):
    """The model returning (logits, head input, early activation averaged over space): the OOD features."""

    def __init__(self, model: torch.nn.Module, head: str, early: str, early_call: int):
        super().__init__()
        from bloodray.ood import FeatureTap

        self.model = model
        self.tap = FeatureTap(model, head, early, early_call)

    def forward(self, x):
        logits = self.model(x)
        return logits, self.tap.pen.pop(), self.tap.early.pop()


class OpenVinoForward:
    """Float NCHW batch -> logits, run by OpenVINO on ``threads`` CPU threads in ``precision`` (fp32 or bf16).

    ``features``: (head path, early layer, its call index) of the OOD features; each call appends them to the
    ``tap`` passed in (a :class:`bloodray.ood.FeatureTap`), as torch's forward hooks would.
    """

    def __init__(self, model: torch.nn.Module, input_size: int, precision: str, threads: int,
                 features: tuple[str, str, int]):
        import openvino as ov

        if precision not in _HINT:
            raise ValueError(f"OpenVINO runs fp32 or bf16, not {precision}")
        wrapped = _WithFeatures(explicit_padding(model), *features).eval()
        example = torch.zeros(2, 3, input_size, input_size)
        # From torch.export (torch.jit.trace, OpenVINO's other route, is deprecated); the hooks run while exporting.
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
        converted = ov.convert_model(exported)
        converted.reshape({converted.inputs[0]: ov.PartialShape([-1, 3, input_size, input_size])})
        compiled = ov.Core().compile_model(converted, "CPU", {
            "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": _HINT[precision]})
        self.request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor, tap=None) -> torch.Tensor:
        out = self.request.infer({0: np.ascontiguousarray(x.float().cpu().numpy())})
        logits, pen, early = (torch.from_numpy(np.array(out[i], dtype=np.float32)) for i in range(3))
        if tap is not None:
            tap.pen.append(pen)
            tap.early.append(early)
        return logits
