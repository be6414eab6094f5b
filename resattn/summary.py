"""Size and cost of every preset: `python -m resattn.summary` prints the README's model table.

MACs count the multiply-accumulates of convolutions and the classifier for one 32x32 image
(half of what torch's FLOP counter reports); normalisation, pooling, resizing and the
element-wise merge are left out, as is usual. Training FLOPs count one forward and backward
pass the same way (two FLOPs per multiply-accumulate), which is what a matrix unit's peak is
quoted in.
"""

from __future__ import annotations

import argparse
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resattn.model import PRESETS, create_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass for a single image."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_training_flops(model: nn.Module, image_size: int = 32) -> int:
    """FLOPs of one training image's forward and backward pass (the input needs no gradient).

    Counted on a batch of two, since batch norm in training mode needs more than one value per
    channel at the smallest feature map, and on a copy, since training updates batch norm's
    statistics and leaves gradients behind.
    """
    copy = deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        copy(torch.zeros(2, 3, image_size, image_size)).sum().backward()
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class PresetSummary:
    name: str
    depth: int
    ptr: str
    modules_per_stage: tuple[int, int, int]
    widths: tuple[int, ...]
    params: int
    macs: int
    paper_params_millions: float | None
    paper_cifar10_error: float | None


def summarise(name: str) -> PresetSummary:
    preset = PRESETS[name]
    model = create_model(name)
    config = model.config
    return PresetSummary(
        name=name,
        depth=config.depth,
        ptr=f"{config.p},{config.t},{config.r}",
        modules_per_stage=config.modules_per_stage,
        widths=(config.stem_width, *config.stage_widths),
        params=count_parameters(model),
        macs=count_macs(model),
        paper_params_millions=preset.paper_params_millions,
        paper_cifar10_error=preset.paper_cifar10_error,
    )


def markdown_table(rows: list[PresetSummary]) -> str:
    def optional(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    lines = [
        "| preset | depth | p,t,r | modules per stage | widths (stem, stages) | params | MMACs / image | paper params | paper CIFAR-10 error |",
        "|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.name}` | {row.depth} | {row.ptr} | {'/'.join(map(str, row.modules_per_stage))} "
            f"| {'/'.join(map(str, row.widths))} | {row.params / 1e6:.2f}M | {row.macs / 1e6:.0f} "
            f"| {optional(row.paper_params_millions, '.1f')}{'M' if row.paper_params_millions else ''} "
            f"| {optional(row.paper_cifar10_error, '.2f')}{'%' if row.paper_cifar10_error else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=list(PRESETS), help="default: all")
    args = parser.parse_args(argv)
    unknown = [name for name in args.presets if name not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from: {', '.join(PRESETS)}")
    print(markdown_table([summarise(name) for name in args.presets]))


if __name__ == "__main__":
    main()
