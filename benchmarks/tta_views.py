"""Test-time augmentation views on the validation split of a trained model, side by side in one
run: one view, flip (2 views), flip + 1-pixel translations (6 views). Prints accuracy, its gain
over one view and the evaluation time of each; record results in BENCHMARKS.md.

    python benchmarks/tta_views.py --model models/model.pt --prepared data/prepared

The validation split, never the test set: this is for choosing `evaluate.translate_tta`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from resattn.data import load_prepared, to_tensor_nchw
from resattn.model_file import load_model
from resattn.training import evaluate

VARIANTS = {"one view": {}, "flip": {"flip_tta": True}, "flip + translate": {"flip_tta": True, "translate_tta": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    args = parser.parse_args()

    (_, val, norm), _ = load_prepared(args.prepared)
    model = load_model(args.model).to(memory_format=torch.channels_last)
    images, labels = to_tensor_nchw(val.images), torch.from_numpy(val.labels)
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, {args.model}, {len(labels):,} validation images")
    results = {}
    for name, views in VARIANTS.items():
        started = time.perf_counter()
        result = evaluate(model, images, labels, norm, channels_last=True, **views)
        results[name] = (result.accuracy, time.perf_counter() - started)
    single, single_seconds = results["one view"]
    for name, (accuracy, seconds) in results.items():
        print(f"{name:17s} val accuracy {accuracy:.4f} ({accuracy - single:+.4f}), {seconds:.1f} s "
              f"({seconds / single_seconds:.1f}x)")


if __name__ == "__main__":
    main()
