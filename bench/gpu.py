"""GPU figures (issue 6, item 4): ResNet-50 training images/s and JPEG decoding on the GPU.

Run on a machine with a CUDA GPU (no Ray needed):

    python bench/gpu.py --jpegs DIR_OF_ORIGINAL_PBC_JPEGS --output bench/results/gpu.json

1. Training throughput of ResNet-50 at 224 px, batch 256, SGD, on synthetic
   tensors already on the GPU (so it measures the GPU, not an input pipeline):
   bf16 autocast + channels_last against plain fp32 (TF32 convolutions, the
   PyTorch default). Anchor: 2,470 img/s on one A100 with AMP (NVIDIA
   DeepLearningExamples).
2. Inference from JPEG bytes in memory to class probabilities: decoding on the
   CPU (Pillow with DCT scaling, the path the classify job uses, on a thread
   pool of all cores) against decoding on the GPU with nvJPEG
   (``torchvision.io.decode_jpeg(device="cuda")``) and resizing there, for
   bloodnet at 128 px and ResNet-50 at 224 px. Also decode-and-resize alone.
Prints the figures and saves them as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.classes import NUM_CLASSES  # noqa: E402
from bloodray.models import create_model  # noqa: E402
from bloodray.data.preset import EvalPreset  # noqa: E402


#: "cuda" for real figures; "cpu" only to check the script itself (--check-on-cpu).
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeat: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls, with the GPU synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def train_throughput(batch: int, mixed: bool, steps: int) -> float:
    model = create_model("resnet50", NUM_CLASSES).to(DEVICE)
    fmt = torch.channels_last if mixed else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=mixed):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / timed(step, warmup=10, repeat=steps)


def inference_figures(jpegs: list[bytes], size: int, model_name: str, batch: int, **kw) -> dict[str, float]:
    model = create_model(model_name, NUM_CLASSES, **kw).to(DEVICE).to(memory_format=torch.channels_last).eval()
    preset = EvalPreset(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pool = ThreadPoolExecutor(os.cpu_count())
    mean = torch.tensor(preset.mean, device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor(preset.std, device=DEVICE).view(1, 3, 1, 1)
    batches = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    encoded_gpu_inputs = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in chunk] for chunk in batches]

    def classify(x_uint8_nchw):
        x = ((x_uint8_nchw.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            return torch.softmax(model(x).float(), 1)

    def cpu_decode(chunk):
        arrays = list(pool.map(preset.load, chunk))
        return torch.from_numpy(np.stack(arrays)).to(DEVICE).permute(0, 3, 1, 2)

    def gpu_decode(tensors):
        decoded = torchvision.io.decode_jpeg(tensors, device=DEVICE)
        # Most PBC crops share one shape; resize each group of equal shapes in one call.
        out = torch.empty(len(decoded), 3, size, size, device=DEVICE, dtype=torch.uint8)
        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            group = torch.stack([decoded[i] for i in idx]).float()
            resized = F.interpolate(group, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[idx] = resized.round_().clamp_(0, 255).to(torch.uint8)
        return out

    def run_all(decode, inputs, with_model):
        def go():
            for chunk in inputs:
                x = decode(chunk)
                if with_model:
                    classify(x)
        return go

    n = len(jpegs)
    figures = {}
    for label, decode, inputs in (("cpu_decode", cpu_decode, batches), ("gpu_decode", gpu_decode, encoded_gpu_inputs)):
        figures[f"{label}_only_img_s"] = n / timed(run_all(decode, inputs, False), warmup=1, repeat=3)
        figures[f"{label}_end_to_end_img_s"] = n / timed(run_all(decode, inputs, True), warmup=1, repeat=3)
    x = torch.randint(0, 255, (batch, 3, size, size), device=DEVICE, dtype=torch.uint8)
    figures["model_only_img_s"] = batch / timed(lambda: classify(x), warmup=3, repeat=20)
    figures["gpu_over_cpu_end_to_end"] = figures["gpu_decode_end_to_end_img_s"] / figures["cpu_decode_end_to_end_img_s"]
    pool.shutdown()
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jpegs", required=True, help="folder (searched recursively) of original PBC JPEGs")
    p.add_argument("--output", default="bench/results/gpu.json")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--check-on-cpu", action="store_true", help="run tiny sizes on the CPU to test the script")
    args = p.parse_args(argv)
    global DEVICE
    if args.check_on_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    files = sorted(Path(args.jpegs).rglob("*.jpg"))
    jpegs = [f.read_bytes() for f in files]
    result: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (script check only)", "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]),
        "jpegs": len(jpegs),
    }
    train = {}
    for label, mixed in (("bf16_channels_last", True), ("fp32_tf32", False)):
        train[label] = train_throughput(args.batch, mixed, args.train_steps)
        print(f"resnet50 224px train {label}: {train[label]:.0f} img/s", flush=True)
    train["bf16_over_fp32"] = train["bf16_channels_last"] / train["fp32_tf32"]
    train["over_a100_amp_anchor_2470"] = train["bf16_channels_last"] / 2470.0
    result["resnet50_train_224_bs256"] = train
    result["inference"] = {
        "bloodnet_bn_128": inference_figures(jpegs, 128, "bloodnet", args.batch, input_size=128, batch_norm=True),
        "resnet50_224": inference_figures(jpegs, 224, "resnet50", args.batch),
    }
    print(json.dumps(result, indent=2), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
