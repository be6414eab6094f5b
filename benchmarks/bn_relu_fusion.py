"""Batch norm + ReLU in training, eager against torch.compile, on the shapes a pipeline worker
runs: the question behind fusing them to lift the CPU's share of its matrix-multiply peak.

    python benchmarks/bn_relu_fusion.py                # one thread, as each pipeline worker
    python benchmarks/bn_relu_fusion.py --threads 2

Batch norm and ReLU take 28% of an Attention-92 step on a CPU and do little arithmetic
(BENCHMARKS.md, "Against the machine's matrix-multiply peak"). Inductor fuses the pair into one
kernel forward and one backward; this times one forward and backward pass of the pair per shape
(batch 64, bf16 activations in channels_last, fp32 affine parameters, as under the pipeline's
autocast), eager and compiled side by side, after warm-up steps that include the compilation.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (batch, channels, side): a unit's outer and bottleneck widths in each of Attention-92's stages.
SHAPES = [(64, 64, 32), (64, 16, 32), (64, 128, 16), (64, 32, 16), (64, 256, 8), (64, 64, 8)]


def bn_relu(x, weight, bias, running_mean, running_var):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training=True))


def time_pass(fn, batch: int, channels: int, side: int, steps: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per forward and backward pass, and the input's gradient."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, channels, side, side)

    def activation() -> torch.Tensor:
        return (torch.randn(shape, generator=generator).to(torch.bfloat16)
                .contiguous(memory_format=torch.channels_last))

    x = activation().requires_grad_()
    grad_out = activation()
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    for _ in range(warmup):
        x.grad = None
        fn(x, weight, bias, running_mean, running_var).backward(grad_out)
    start = time.perf_counter()
    for _ in range(steps):
        x.grad = None
        fn(x, weight, bias, running_mean, running_var).backward(grad_out)
    return (time.perf_counter() - start) / steps * 1e3, x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), torch {torch.__version__}")
    print("| batch x channels x side² | eager ms | compiled ms | eager / compiled | max grad difference |")
    print("|---|---:|---:|---:|---:|")
    for batch, channels, side in SHAPES:
        torch._dynamo.reset()  # each shape compiles from nothing, as a new layer would
        compiled = torch.compile(bn_relu, dynamic=False)
        eager_ms, eager_grad = time_pass(bn_relu, batch, channels, side, args.steps, args.warmup_steps)
        compiled_ms, compiled_grad = time_pass(compiled, batch, channels, side, args.steps, args.warmup_steps)
        difference = (eager_grad.float() - compiled_grad.float()).abs().max().item()
        print(f"| {batch} x {channels} x {side}² | {eager_ms:.2f} | {compiled_ms:.2f} | "
              f"{eager_ms / compiled_ms:.2f}x | {difference:.3g} |", flush=True)


if __name__ == "__main__":
    main()
