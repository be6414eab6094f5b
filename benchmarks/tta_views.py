"""Test-time augmentation views on the validation split of a trained model, side by side in one
run: one view, flip (2 views), flip + 1-pixel translations (6 views), each in fp32 and, where the
machine computes it natively, in the mixed precision training and evaluation use (bf16 on a CPU
with AVX-512 BF16 or AMX). Prints accuracy, its gain over one view in fp32 and the evaluation
time of each; record results in BENCHMARKS.md.

    python benchmarks/tta_views.py --model models/model.pt --prepared data/prepared
    python benchmarks/tta_views.py --checkpoint ray_results/train-<id>/checkpoint_<newest>/state.pt

With `--checkpoint`, the final training state of a run with a weight average (`train.ema_decay`)
is scored twice, its weight average (what the model file keeps) and its weights themselves: what
the average bought on that run. The validation split, never the test set: this is for choosing
`evaluate.translate_tta` and `train.ema_decay`.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from resattn.data import load_prepared, to_tensor_nchw
from resattn.model_file import load_model
from resattn.training import autocast_dtype, evaluate, precision_name, trained_weights

VARIANTS = {"one view": {}, "flip": {"flip_tta": True}, "flip + translate": {"flip_tta": True, "translate_tta": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--checkpoint", type=Path, help="a training state with a weight average, of the model "
                        "--model holds: score both its average and its weights")
    args = parser.parse_args()

    (_, val, norm), _ = load_prepared(args.prepared)
    model = load_model(args.model).to(memory_format=torch.channels_last)
    models = {str(args.model): model}
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if "weight_average" not in state:
            raise SystemExit(f"error: {args.checkpoint} keeps no weight average (train.ema_decay was 0)")
        models = {"weight average": copy.deepcopy(model), "weights": copy.deepcopy(model)}
        models["weight average"].load_state_dict(trained_weights(state))
        models["weights"].load_state_dict(state["model"])
    images, labels = to_tensor_nchw(val.images), torch.from_numpy(val.labels)
    precisions = list(dict.fromkeys([None, autocast_dtype(torch.device("cpu"), True)]))
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, {args.checkpoint or args.model}, "
          f"{len(labels):,} validation images")
    for label, scored in models.items():
        results = {}
        for name, views in VARIANTS.items():
            for precision in precisions:
                started = time.perf_counter()
                result = evaluate(scored, images, labels, norm, channels_last=True, autocast_dtype=precision, **views)
                results[name, precision_name(precision)] = (result.accuracy, time.perf_counter() - started)
        single, single_seconds = results["one view", "float32"]
        for (name, precision), (accuracy, seconds) in results.items():
            print(f"{label}: {name:17s} {precision:8s} val accuracy {accuracy:.4f} ({accuracy - single:+.4f}), "
                  f"{seconds:.1f} s ({seconds / single_seconds:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
