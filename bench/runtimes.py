"""CPU inference routes side by side on the packaged model: torch fp32 and bf16 (as :class:`CellPredictor` runs
them), int8 through PT2E (torchao's X86InductorQuantizer, eager and compiled by inductor), ONNX Runtime (fp32 and
its static int8 quantization) and OpenVINO (fp32, bf16 hint, the same int8 QDQ model, and the predictor's own
``runtime="openvino"`` path, OOD features included).

Issue 20 item 1: a route is kept only if it is faster than torch bf16 where measured AND passes the checkpoint's
sealed self-check (:func:`bloodray.inference_precision.compare`) AND gives the fp32 class on >= 99.9 % of the PBC
test split. Preprocessing (decode, preset with the fast stain transform) is done once, outside the timing: the
figures are the forward pass alone, img/s with 1 and with 2 intra-op threads, best of ``--rounds`` interleaved
rounds (route A, B, C, A, B, C...: the machine is shared). int8 routes are calibrated on ``--calibration`` cells of
the PBC TRAIN split. Run by hand (about 10 minutes on 2 loaded cores, most of it inductor compiling)::

    PYTHONPATH=$PWD .venv/bin/python bench/runtimes.py [--rounds 5] [--speed-images 256]

Needs ``onnxruntime``, ``onnx``, ``onnxscript``, ``openvino`` and ``torchao`` (bench-only; a route whose package is
missing is reported as skipped). Writes ``bench/results/runtimes.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import decode, pbc_split_rows  # noqa: E402

from bloodray.openvino_runtime import explicit_padding  # noqa: E402

CHUNK = 32  # images per call of the non-torch routes (torch routes use CellPredictor's own micro-batch)


def chunked(fn: Callable, x, step: int = CHUNK) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + step]), dtype=np.float32) for i in range(0, len(x), step)])


def torch_route(predictor):
    import torch

    def run(x):
        with torch.inference_mode(), predictor.autocast:
            return predictor._forward(x).numpy()
    return run


def pt2e_int8(model, example, calib):
    """(eager, compiled) runners of the PT2E int8 model; compiled: inductor with freezing (oneDNN int8 kernels)."""
    import torch
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(explicit_padding(model), (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), CHUNK):
            prepared(calib[i:i + CHUNK])
    quantized = convert_pt2e(prepared)
    inductor_config.freezing = True
    compiled = torch.compile(quantized, dynamic=False)

    def eager(x):
        with torch.no_grad():
            return quantized(x).numpy()

    def comp(x):
        # One compiled shape: a short last batch is padded (a new shape would compile again, for minutes).
        n = len(x)
        if n < CHUNK:
            x = torch.cat([x, x.new_zeros(CHUNK - n, *x.shape[1:])])
        with torch.no_grad():
            return compiled(x)[:n].numpy()
    return eager, comp


def onnx_models(model, example, calib: np.ndarray, folder: Path) -> tuple[Path, Path]:
    """fp32 ONNX export of ``model`` and its ONNX Runtime static int8 quantization (QDQ, per-channel weights)."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = folder / "model.onnx"
    torch.onnx.export(explicit_padding(model), (example,), str(fp32), input_names=["x"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), dynamo=True,
                      external_data=False)
    pre = folder / "model_pre.onnx"
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calib[i:i + CHUNK]} for i in range(0, len(calib), CHUNK)])

        def get_next(self):
            return next(self.batches, None)

    int8 = folder / "model_int8.onnx"
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fp32, int8


def ort_route(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def openvino_route(source, threads: int, precision: str, size: int, example=None):
    import openvino as ov

    core = ov.Core()
    model = ov.convert_model(source, example_input=example) if example is not None else core.read_model(str(source))
    model.reshape(ov.PartialShape([-1, 3, size, size]))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--only", default="", help="comma-separated words: build only the routes whose name has one "
                        "(torch fp32 and bf16 always run), e.g. --only OpenVINO")
    parser.add_argument("--name", default="runtimes", help="result file name under bench/results/")
    args = parser.parse_args()
    import torch

    from bloodray.inference_precision import compare, load_selfcheck
    from bloodray.predict import CellPredictor

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    result = {"machine": _common.machine_facts(), "run": _common.run_facts(), "chunk": CHUNK}
    fp32 = CellPredictor(None, device="cpu", precision="fp32")
    bf16 = CellPredictor(None, device="cpu", precision="bf16")
    preset, temperature = fp32.preset, fp32.temperature
    check = load_selfcheck(fp32.loaded.uri, fp32.meta)
    test_rows, _ = pbc_split_rows("test")
    train_rows, _ = pbc_split_rows("train")
    pick = np.random.default_rng(0).choice(len(train_rows), args.calibration, replace=False)
    labels = np.array([y for _, y in test_rows])
    # Preprocessing once, outside any timing: the preset (fast uint8 stain transform) as CellPredictor runs it.
    test_u8 = decode([Path(u) for u, _ in test_rows], preset.input_size)
    test_x = preset.normalize(test_u8)
    calib = preset.normalize(decode([Path(train_rows[i][0]) for i in pick], preset.input_size)).contiguous()
    check_x = preset.normalize(check.images)
    x_np = test_x.contiguous().numpy()
    inputs = {"torch": test_x, "torch_cl": preset.normalize(test_u8, channels_last=True), "numpy": x_np}
    threads = [int(t) for t in args.threads.split(",")]
    routes: dict[str, tuple[str, dict[int, Callable]]] = {}  # name -> (input kind, threads -> runner)
    notes: dict[str, str] = {}
    setup_s: dict[str, float] = {}
    only = [w.lower() for w in args.only.split(",") if w]

    def wanted(name: str) -> bool:
        return not only or any(w in name.lower() for w in only)

    routes["torch fp32 (CellPredictor)"] = ("torch", {t: torch_route(fp32) for t in threads})
    routes[f"torch {bf16.precision} autocast (CellPredictor)"] = ("torch_cl", {t: torch_route(bf16) for t in threads})
    # The torch routes run with the OOD feature hooks, as the job does; the other routes do not compute those
    # features. bf16 without the hooks shows what they cost.
    bare = CellPredictor(None, device="cpu", precision="bf16")
    if bare.tap is not None:
        bare.tap.close()
    routes[f"torch {bare.precision} autocast, no OOD hooks"] = ("torch_cl", {t: torch_route(bare) for t in threads})
    result["bf16_resolved_to"], result["bf16_refused"] = bf16.precision, bf16.refused
    if wanted("CellPredictor runtime openvino"):
        # What `inference.runtime: openvino` runs: the predictor's own OpenVINO path, OOD features included.
        ovp = CellPredictor(None, device="cpu", precision="bf16", runtime="openvino")
        routes[f"OpenVINO {ovp.precision} (CellPredictor runtime openvino)"] = (
            "torch", {t: torch_route(ovp) for t in threads})
        result["openvino_predictor"] = {"runtime": ovp.runtime, "precision": ovp.precision, "refused": ovp.refused}
    result["micro_batch"] = {"fp32": fp32.micro_batch, "bf16": bf16.micro_batch}
    example = calib[:CHUNK]
    try:
        if not wanted("int8 PT2E"):
            raise LookupError("not asked for (--only)")
        start = time.perf_counter()
        eager, comp = pt2e_int8(fp32.model, example, calib)
        setup_s["quantize (PT2E)"] = time.perf_counter() - start
        start = time.perf_counter()
        comp(example)  # inductor compiles here
        setup_s["torch.compile of the int8 model (first call)"] = time.perf_counter() - start
        routes["int8 PT2E x86 quantizer, eager"] = ("numpy_eager", {1: eager})
        routes["int8 PT2E x86 quantizer, torch.compile (inductor)"] = ("torch_c", {t: comp for t in threads})
    except Exception as exc:  # noqa: BLE001 - a route that cannot be built is a result, not a crash
        notes["int8 PT2E"] = f"not built: {type(exc).__name__}: {exc}"[:300]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if not wanted("ONNX Runtime") and not wanted("OpenVINO int8"):
                raise LookupError("not asked for (--only)")
            start = time.perf_counter()
            onnx_fp32, onnx_int8 = onnx_models(fp32.model, example, calib.numpy(), Path(tmp))
            setup_s["ONNX export + ORT static int8 quantization"] = time.perf_counter() - start
            for name, path in (("ONNX Runtime fp32", onnx_fp32), ("ONNX Runtime int8 (static QDQ)", onnx_int8)):
                if wanted(name):
                    routes[name] = ("numpy", {t: ort_route(path, t) for t in threads})
        except Exception as exc:  # noqa: BLE001
            notes["ONNX Runtime"] = f"not built: {type(exc).__name__}: {exc}"[:300]
            onnx_int8 = None
        for name, source, hint in (("OpenVINO fp32", "torch", "f32"), ("OpenVINO bf16 hint", "torch", "bf16"),
                                   ("OpenVINO int8 (the ORT QDQ model)", "int8", "f32")):
            if not wanted(name):
                continue
            try:
                if source == "int8" and onnx_int8 is None:
                    raise RuntimeError("no int8 ONNX model")
                src, ex = (explicit_padding(fp32.model), example) if source == "torch" else (onnx_int8, None)
                routes[name] = ("numpy", {t: openvino_route(src, t, hint, preset.input_size, ex) for t in threads})
            except Exception as exc:  # noqa: BLE001
                notes[name] = f"not built: {type(exc).__name__}: {exc}"[:300]

    # Quality: the whole test split through each route (2 threads), against torch fp32.
    torch.set_num_threads(max(threads))
    quality, outs = {}, {}
    for name, (kind, run) in routes.items():
        fn = run[max(t for t in run)]
        src = {"torch_c": test_x.contiguous(), "numpy_eager": test_x}.get(kind, inputs.get(kind))
        ck = check_x.contiguous(memory_format=torch.channels_last) if kind == "torch_cl" else check_x.contiguous()
        ck = ck.numpy() if kind == "numpy" else ck
        reason = compare(chunked(lambda b: fn(b), ck), check.logits, temperature)
        q = {"selfcheck": "pass" if reason is None else f"FAIL: {reason}"}
        if kind != "numpy_eager":  # eager int8 runs reference q/dq arithmetic: too slow for 1,985 cells
            outs[name] = logits = chunked(fn, src)
            q.update(accuracy=float((logits.argmax(1) == labels).mean()))
        quality[name] = q
        print(name, q, flush=True)
    ref = outs["torch fp32 (CellPredictor)"]
    ref_p = torch.softmax(torch.from_numpy(ref) / temperature, 1).numpy()
    for name, logits in outs.items():
        probs = torch.softmax(torch.from_numpy(logits) / temperature, 1).numpy()
        quality[name].update(same_class_as_fp32=float((logits.argmax(1) == ref.argmax(1)).mean()),
                             max_prob_diff=float(np.abs(probs - ref_p).max()))
    result.update(quality=quality, notes=notes, setup_seconds=setup_s, test_cells=len(labels))
    _common.save(args.name, result, "quality only so far\n")

    # Speed: forward only, interleaved rounds, best of --rounds.
    n = args.speed_images
    speed: dict[str, dict[int, float]] = {name: {} for name in routes}
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(args.rounds):
            for name, (kind, run) in routes.items():
                if t not in run:
                    continue
                n_here = CHUNK if kind == "numpy_eager" else n
                src = {"torch_c": test_x[:n_here].contiguous(), "numpy_eager": test_x[:n_here]}.get(
                    kind, inputs.get(kind, test_x)[:n_here])
                start = time.perf_counter()
                if kind.startswith("torch") and kind != "torch_c":
                    run[t](src)
                else:
                    chunked(run[t], src)
                speed[name][t] = max(speed[name].get(t, 0.0), n_here / (time.perf_counter() - start))
        print("threads", t, {k: round(v.get(t, 0)) for k, v in speed.items()}, flush=True)
    result["images_per_s"] = speed
    base = "torch fp32 (CellPredictor)"
    bf16_name = f"torch {bf16.precision} autocast (CellPredictor)"
    rows = []
    for name in routes:
        q = quality[name]
        rows.append([name] + [f"{speed[name][t]:.0f}" if t in speed[name] else "-" for t in threads]
                    + [f"{speed[name][1] / speed[base][1]:.2f}x" if 1 in speed[name] else "-",
                       f"{speed[name][1] / speed[bf16_name][1]:.2f}x" if 1 in speed[name] else "-",
                       q["selfcheck"], f"{q['same_class_as_fp32']:.4f}" if "same_class_as_fp32" in q else "-",
                       f"{q['max_prob_diff']:.3f}" if "max_prob_diff" in q else "-",
                       f"{q['accuracy']:.4f}" if "accuracy" in q else "-"])
    md = ("# CPU inference routes side by side (bench/runtimes.py)\n\n" + _common.facts_markdown(result)
          + f"\nPackaged model, forward pass only (preprocessed PBC test cells, {n} per timing), best of "
            f"{args.rounds} interleaved rounds; torch routes with CellPredictor's micro-batch {result['micro_batch']},"
            f" other routes {CHUNK} images per call. Quality on the {len(labels)} PBC test cells (split 0.7/0.1/0.2 "
            f"seed 0) against torch fp32; int8 calibrated on {args.calibration} TRAIN cells. Self-check: the 32 "
            f"sealed cells, `compare` with PROB_TOLERANCE.\n\n"
          + _common.table(["route"] + [f"img/s, {t} thread{'s' * (t > 1)}" for t in threads]
                          + ["vs fp32 (1 thr.)", "vs bf16 (1 thr.)", "self-check", "same class as fp32",
                             "max prob. diff", "accuracy"], rows)
          + "\nSet-up seconds: " + ", ".join(f"{k} {v:.0f} s" for k, v in setup_s.items()) + "\n"
          + "".join(f"\n- {k}: {v}" for k, v in notes.items()) + "\n")
    _common.save(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
