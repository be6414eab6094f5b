"""Training throughput, side by side on one machine: reference-style input pipeline and eager fp32
against resattn's fast paths. Prints images/s and ratios; record results in BENCHMARKS.md.

    python benchmarks/train_throughput.py --presets attention56_narrow attention92 --images 1024
    python benchmarks/train_throughput.py --presets attention92 --images 16384 --compile   # on a CUDA GPU

(a) reference: torchvision per-image PIL transforms (pad-4 random crop, flip, ToTensor,
    Normalize) through a DataLoader, batch 64, eager fp32, NCHW — how the popular ports train;
(b) each resattn fast path added in turn: batched uint8 tensor augmentation, channels_last,
    mixed precision, and (with --compile) torch.compile in the arithmetic the pipeline trains in
    here (`resattn.training.autocast_dtype`). On a CPU without bf16 instructions the mixed
    row is bf16 all the same, marked emulated: it shows why the pipeline trains in fp32 there.
Every variant runs the same model (same initial weights), optimizer and image count. The data
path alone (load + augment + normalise) is timed too, since it must never bound training.
Each rate is also put as a share of the machine's matrix-multiply peak in the arithmetic it
runs in (a square GEMM of --gemm-size, timed on the same threads): the training FLOPs of one
image (forward and backward, `resattn.summary.count_training_flops`) times images per second.
On a CUDA GPU (the default when one is visible, else `--device cpu`) the reference's batches
are copied to it from pinned memory and ours live on it whole, as in the pipeline.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from resattn import cifar10, create_model
from resattn.data import Normalization, channel_stats, normalize, random_crop_flip, to_tensor_nchw
from resattn.summary import count_training_flops
from resattn.training import (autocast_dtype, build_optimizer, build_scheduler, grad_scaler, precision_name,
                              train_epoch, training_model)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "cifar-10-batches-py"


class PilDataset(torch.utils.data.Dataset):
    """CIFAR images as PIL images through per-image transforms, like torchvision's CIFAR10."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def reference_loader(images, labels, norm: Normalization, batch_size: int, workers: int,
                     device: torch.device = torch.device("cpu")):
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(norm.mean, norm.std)])
    return torch.utils.data.DataLoader(PilDataset(images, labels, transform), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       pin_memory=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def time_reference(preset: str, images, labels, norm, args) -> float:
    torch.manual_seed(0)
    model = create_model(preset).to(args.device).train()
    optimizer = build_optimizer(model, "sgd", 0.05, weight_decay=5e-4)
    seen, started = 0, None
    for step, (x, y) in enumerate(reference_loader(images, labels, norm, 64, args.loader_workers, args.device)):
        if step == args.warmup_steps:
            synchronize(args.device)
            started, seen = time.perf_counter(), 0
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    synchronize(args.device)
    return seen / (time.perf_counter() - started)


def time_ours(preset: str, images, labels, norm, args, *, channels_last: bool, dtype: torch.dtype | None,
              compile: bool) -> float:
    torch.manual_seed(0)
    model = training_model(preset, channels_last=channels_last, device=args.device)
    runner = torch.compile(model) if compile else model
    optimizer = build_optimizer(model, "sgd", 0.05, weight_decay=5e-4)
    scheduler = build_scheduler(optimizer, total_steps=10**6, schedule="constant")
    kwargs = dict(batch_size=args.batch_size, seed=0, channels_last=channels_last, device=args.device,
                  autocast_dtype=dtype, scaler=grad_scaler(args.device, dtype))
    warm = args.warmup_steps * args.batch_size
    train_epoch(runner, optimizer, scheduler, images[:warm], labels[:warm], norm, epoch=0, **kwargs)
    return train_epoch(runner, optimizer, scheduler, images, labels, norm, epoch=1, **kwargs).images_per_second


def matmul_peak_flops(dtype: torch.dtype, size: int, device: torch.device, seconds: float = 2.0) -> float:
    """FLOP/s of back-to-back square matrix products: the most this arithmetic gives here."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):  # oneDNN / cuBLAS pick and cache their kernels on the first calls
        torch.mm(a, b, out=out)
    synchronize(device)
    products, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b, out=out)
        products += 1
        if products % 8 == 0:  # a GPU queues products asynchronously: bound what runs past the clock
            synchronize(device)
    synchronize(device)
    return 2 * size**3 * products / (time.perf_counter() - started)


def data_path_rates(images_nhwc, labels, images_nchw, norm, args) -> tuple[float, float]:
    loader = reference_loader(images_nhwc, labels, norm, 64, args.loader_workers)
    started = time.perf_counter()
    count = sum(len(y) for _, y in loader)
    reference = count / (time.perf_counter() - started)
    images_nchw = images_nchw.to(args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)  # offsets drawn where the images are
    synchronize(args.device)
    started = time.perf_counter()
    for start in range(0, len(images_nchw), args.batch_size):
        normalize(random_crop_flip(images_nchw[start : start + args.batch_size], generator), norm)
    synchronize(args.device)
    ours = len(images_nchw) / (time.perf_counter() - started)
    return reference, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 python-version folder")
    parser.add_argument("--presets", nargs="+", default=["attention56_narrow", "attention92"])
    parser.add_argument("--images", type=int, default=1024, help="timed training images per variant")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the fast paths")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader workers of the reference (0: in-process; on 2 cores workers steal the model's CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation on a CPU)")
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM that measures the peak")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train, _ = cifar10.load(args.data)
    count = args.images + args.warmup_steps * max(args.batch_size, 64)
    images_nhwc, labels_np = train.images[:count], train.labels[:count]
    mean, std = channel_stats(train.images)
    norm = Normalization(tuple(mean), tuple(std))
    images, labels = to_tensor_nchw(images_nhwc), torch.from_numpy(labels_np)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"

    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, {device_name}, "
          f"torch {torch.__version__}, {args.images} timed images per variant")
    reference_data, our_data = data_path_rates(images_nhwc, labels_np, images, norm, args)
    print(f"data path alone: reference {reference_data:,.0f} img/s, ours {our_data:,.0f} img/s "
          f"({our_data / reference_data:.1f}x)")
    trained_in = autocast_dtype(args.device, mixed_precision=True)  # None: the pipeline trains in fp32 here
    mixed = trained_in or torch.bfloat16
    peaks = {dtype: matmul_peak_flops(dtype, args.gemm_size, args.device) for dtype in (torch.float32, mixed)}
    print("matrix-multiply peak, " + ", ".join(
        f"{precision_name(dtype)}: {flops / 1e9:,.0f} GFLOP/s" for dtype, flops in peaks.items())
        + f" ({args.gemm_size}x{args.gemm_size} GEMM)")
    variants = [("batched aug, fp32", False, None, False), ("+ channels_last", True, None, False),
                (f"+ {precision_name(mixed)} autocast" + ("" if trained_in else " (emulated)"), True, mixed, False)]
    if args.compile:
        variants.append((f"+ torch.compile, {precision_name(trained_in)}", True, trained_in, True))
    for preset in args.presets:
        flops_per_image = count_training_flops(create_model(preset))

        def share_of_peak(rate: float, dtype: torch.dtype | None) -> str:
            flops = rate * flops_per_image
            return f"{flops / 1e9:6.1f} GFLOP/s = {flops / peaks[dtype or torch.float32]:5.1%} of {precision_name(dtype)} peak"

        print(f"{preset}: {flops_per_image / 1e9:.3f} GFLOP per training image")
        reference = time_reference(preset, images_nhwc, labels_np, norm, args)
        print(f"{preset}: (a) {'reference':<30} {reference:7.1f} img/s  1.00x (a)   {share_of_peak(reference, None)}")
        for name, channels_last, dtype, compile in variants:
            rate = time_ours(preset, images.to(args.device), labels.to(args.device), norm, args,
                             channels_last=channels_last, dtype=dtype, compile=compile)
            print(f"{preset}: (b) {name:<30} {rate:7.1f} img/s  {rate / reference:4.2f}x (a)"
                  f"   {share_of_peak(rate, dtype)}   data path / training = {our_data / rate:,.0f}x")


if __name__ == "__main__":
    main()
