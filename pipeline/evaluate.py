"""DVC stage `evaluate`: the final model on the test set, read here and nowhere else.

Writes reports/evaluate.json (test and per-class accuracy), reports/confusion.csv (DVC
confusion plot), reports/confusion.png and reports/attention_masks.png (the paper's figure:
what each attention module looks at), and logs all of it to the training run in MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from mlflow.tracking import MlflowClient

from pipeline.common import MODEL_FILE, RUN_FILE, StageError, run_stage, save_figure
from pipeline.config import Params
from pipeline.remote import check_tracking_server
from pipeline.tracking import resolve_tracking_uri
from resattn.cifar10 import CLASSES
from resattn.data import Normalization, load_split, normalize, to_tensor_nchw, write_csv, write_json
from resattn.model import ResidualAttentionNet
from resattn.model_file import load_model
from resattn.training import autocast_dtype, confusion_matrix, evaluate, precision_name

REPORTS = Path("reports")
METRICS_FILE = REPORTS / "evaluate.json"
CONFUSION_CSV = REPORTS / "confusion.csv"
CONFUSION_PNG = REPORTS / "confusion.png"
MASKS_PNG = REPORTS / "attention_masks.png"


def load_trained_model(path: Path) -> ResidualAttentionNet:
    """The model file's network; a missing or unreadable file fails the stage with one line."""
    try:
        return load_model(path)
    except ValueError as error:
        raise StageError(str(error)) from None


def plot_confusion(counts: torch.Tensor, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    shares = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("CIFAR-10 test confusion (counts; colour: share of the actual class)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_attention_masks(model: ResidualAttentionNet, images: torch.Tensor, labels: torch.Tensor,
                         norm: Normalization, path: Path) -> None:
    """One row per image: the image, then each module's mask averaged over channels."""
    masks = model.attention_masks(normalize(images, norm))
    columns = 1 + len(masks)
    fig, axes = plt.subplots(len(images), columns, figsize=(1.6 * columns, 1.6 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        axes[row][0].imshow(image.permute(1, 2, 0).numpy())
        axes[row][0].set_title(CLASSES[labels[row]], fontsize=8)
        for column, (name, mask) in enumerate(masks.items(), start=1):
            axes[row][column].imshow(mask[row].float().mean(0).numpy(), cmap="inferno")
            if row == 0:
                axes[row][column].set_title(name.removeprefix("stages.").replace(".attention", " m"), fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("soft attention masks M(x), mean over channels (each panel on its own scale; bright = high)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def evaluate_model(params: Params, model_path: Path, run_id: str, reports: Path) -> dict:
    """Test-set metrics and figures for one model, written under `reports` and logged to the
    MLflow run `run_id`. The only code that reads the test set."""
    prepared = Path(params.data.prepared_dir)
    test = load_split(prepared / "test.npz")
    norm = Normalization.load(prepared)
    model = load_trained_model(model_path).to(memory_format=torch.channels_last)
    images, labels = to_tensor_nchw(test.images), torch.from_numpy(test.labels)
    # In the run's precision, as validation scores: on a 2-core Zen 5 CPU bf16 scored six views
    # 2.3-2.5x faster than fp32, within 0.06 points (BENCHMARKS.md, "Test-time augmentation views").
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = autocast_dtype(device, params.train.mixed_precision)
    result = evaluate(model.to(device), images, labels, norm, batch_size=params.evaluate.batch_size,
                      flip_tta=params.evaluate.flip_tta, translate_tta=params.evaluate.translate_tta,
                      channels_last=True, device=device,
                      autocast_dtype=precision)
    model = model.cpu()
    counts = confusion_matrix(labels, result.predictions, len(CLASSES))
    per_class = {cls: counts[i, i].item() / max(counts[i].sum().item(), 1) for i, cls in enumerate(CLASSES)}
    metrics = {"test_accuracy": result.accuracy, "test_loss": result.loss, "flip_tta": params.evaluate.flip_tta,
               "translate_tta": params.evaluate.translate_tta, "precision": precision_name(precision),
               "test_accuracy_single_view": result.single_view_accuracy, "per_class_accuracy": per_class}
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / METRICS_FILE.name, metrics)
    write_csv(reports / CONFUSION_CSV.name, [{"actual": CLASSES[a], "predicted": CLASSES[p]}
                                             for a, p in zip(labels.tolist(), result.predictions.tolist())])
    plot_confusion(counts, reports / CONFUSION_PNG.name)
    # The first test image of each class, in class order, up to mask_images.
    firsts = [int((labels == c).nonzero()[0]) for c in range(len(CLASSES)) if (labels == c).any()]
    chosen = torch.tensor(firsts[: params.evaluate.mask_images])
    plot_attention_masks(model, images[chosen], labels[chosen], norm, reports / MASKS_PNG.name)

    client = MlflowClient(resolve_tracking_uri(params.mlflow.tracking_uri))
    client.log_metric(run_id, "test_accuracy", result.accuracy)
    client.log_metric(run_id, "test_loss", result.loss)
    client.log_metric(run_id, "test_accuracy_single_view", result.single_view_accuracy)
    for cls, accuracy in per_class.items():
        client.log_metric(run_id, f"test_accuracy_{cls}", accuracy)
    for name in (METRICS_FILE.name, CONFUSION_PNG.name, MASKS_PNG.name):
        client.log_artifact(run_id, str(reports / name), "evaluation")
    views = " + ".join(name for name, on in (("flip", params.evaluate.flip_tta),
                                              ("translate", params.evaluate.translate_tta)) if on)
    print(f"test accuracy {result.accuracy:.4f}" + (f" ({views} TTA)" if views else ""))
    return metrics


def evaluate_stage(params: Params) -> None:
    check_tracking_server(params.mlflow.tracking_uri)
    evaluate_model(params, MODEL_FILE, json.loads(RUN_FILE.read_text())["run_id"], REPORTS)


if __name__ == "__main__":
    run_stage(__doc__, evaluate_stage)
