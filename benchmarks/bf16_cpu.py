"""Does bf16 pay on this CPU? One classifier training step and one forward, fp32 against bf16 autocast.

    python benchmarks/bf16_cpu.py [--threads 2] [--size 224] [--batch 32]

OphGLM trains and infers in bf16 on a CPU only where `cpu_has_native_bf16()` says the CPU
computes it natively (AVX-512 BF16 or AMX); elsewhere oneDNN emulates bf16 and it is
slower than fp32. This prints both timings, their ratio and what OphGLM chose, measured in
one run, so the choice can be checked on any machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ophglm.settings import cpu_has_native_bf16
from ophglm.tools.vision import create_classifier


def _median_seconds(step, repeats: int) -> float:
    step()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = create_classifier("efficientnet_lite0", 5)
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.zeros(args.batch, 5)

    def train_step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward(bf16: bool):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    print(f"EfficientNet-Lite0, batch {args.batch}, {args.size} px, {args.threads} threads; native bf16: {cpu_has_native_bf16()}")
    for name, step in (("train step", train_step), ("forward", forward)):
        fp32 = _median_seconds(lambda: step(False), args.repeats)
        bf16 = _median_seconds(lambda: step(True), args.repeats)
        print(f"{name:10s}  fp32 {fp32:.2f} s  bf16 {bf16:.2f} s  bf16/fp32 {bf16 / fp32:.2f}")
    print(f"OphGLM uses {'bf16' if cpu_has_native_bf16() else 'fp32'} on this CPU")


if __name__ == "__main__":
    main()
