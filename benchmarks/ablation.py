"""What each training trick buys, at the length that matters: a profile's recipe, and the recipe
with one change at a time, each with two seeds, trained through Ray Tune as one sweep (the
pipeline's own trainer and worker loop; one MLflow parent run, a child run per trial) and
scored on the validation split, never the test set. Prints each variant's final validation
accuracy per seed, their mean and spread, the difference from the recipe's mean, and its minutes
of training (a change that saves time, such as progressive resizing, is worth the accuracy it
costs only if the time buys more epochs); record the table in BENCHMARKS.md. Run it in the
project's root: its params.yaml, conf/ and prepared data are the recipe's.

    dvc repro preprocess       # the pipeline's prepared arrays, which every trial reads
    .venv/bin/python benchmarks/ablation.py --profile fast --epochs 24

The same command again resumes the sweep where it stopped (finished trials are kept, a running
one goes on from its last checkpoint), so an ablation longer than one sitting takes several.
Where the sweep's storage does not outlast a sitting, extend the table instead: a trial's weights
depend only on its params, its seed and the machine's arithmetic, so the recipe measured once
need not be trained again beside each later variant (`--without-recipe`). Each sitting writes its
trials' validation curves (`curves.csv`); `--combine` makes one table and one plot of several
sittings' files, without training (BENCHMARKS.md's table is made so, from the files kept as
`curves-<variant>.csv`):

    .venv/bin/python benchmarks/ablation.py --combine benchmarks/ablation_fast_24ep/curves-*.csv \
        --out benchmarks/ablation_fast_24ep

Each trial trains on one worker (`tune.workers_per_trial`), as many at once as the cluster fits.
Test-time augmentation changes no training: `benchmarks/tta_views.py` measures it on a model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from pipeline.common import failing_in_one_line, save_figure
from pipeline.config import DEFAULT_PARAMS, parse_params, resolve
from pipeline.ray_hooks import quiet_libraries
from pipeline.search import METRIC, build_tuner, trial_raw
from pipeline.tune import open_sweep, run_trial, trial_trainable
from pipeline.worker import UNAVERAGED_SUFFIX
from resattn.data import write_csv, write_text

# name -> the params it changes on top of the recipe (dotted keys, as `dvc exp run -S` sets them)
VARIANTS = {
    "recipe": {},
    "weight-average": {"train.ema_decay": 0.999},
    "alternating-flip": {"train.alternating_flip": True},
    "bn-momentum": {"train.bn_momentum": 0.3},
    "bn-and-bias-lr": {"train.optimizer.norm_and_bias_lr_multiplier": 4.0},
    "no-label-smoothing": {"train.label_smoothing": 0.0},
    "decay-bn-and-bias": {"train.optimizer.decay_norm_and_bias": True},
    "width-0.75": {"model.overrides.width_multiplier": 0.75},  # narrow presets are 0.5: slower, and more capacity
    "progressive-resizing": {"train.progressive_resizing.start_size": 16},  # faster epochs, at 16-28 px
}

UNAVERAGED = f"{METRIC}{UNAVERAGED_SUFFIX}"  # a weight average's trials score the weights it averages too


def ablation_trial(config: dict, *, raw: dict, context: dict, variants: dict) -> None:
    run_trial({**variants[config["variant"]], "train.seed": config["seed"]}, raw=raw, context=context)


def sweep_name(profile: str, epochs: int, variants: dict, seeds: list[int]) -> str:
    """Named after what it runs, so the same command resumes it and another starts afresh."""
    digest = hashlib.sha256(json.dumps([variants, seeds], sort_keys=True).encode()).hexdigest()[:6]
    return f"ablation-{profile}-{epochs}ep-{digest}"


def trial_curves(results) -> list[dict]:
    """Each finished trial's validation after every epoch, and its minutes of training and
    validation so far: the rows of a sitting's curves.csv."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        if result.error is None and history is not None and METRIC in history:
            for epoch in history.to_dict("records"):
                rows.append({"variant": result.config["variant"], "seed": result.config["seed"],
                             "epoch": int(epoch["epoch"]), METRIC: epoch[METRIC],
                             UNAVERAGED: epoch.get(UNAVERAGED, math.nan),
                             "training_minutes": epoch["training_minutes"]})
    return rows


def read_curves(paths: list[Path]) -> list[dict]:
    """The rows of several sittings' curves.csv files; each trial's epochs must come from one file."""
    rows, source = [], {}
    for path in paths:
        try:
            with open(path) as f:
                reader = csv.DictReader(f)
                found = list(reader)
        except OSError as error:
            raise SystemExit(f"error: cannot read {path}: {error.strerror}") from None
        missing = {"variant", "seed", "epoch", METRIC, "training_minutes"} - set(reader.fieldnames or [])
        if missing or not found:
            raise SystemExit(f"error: {path} is not an ablation's curves.csv ("
                             + (f"no {', '.join(sorted(missing))} column" if missing else "no trials")
                             + "): give the curves.csv files that benchmarks/ablation.py wrote")
        for row in found:
            key = (row["variant"], int(row["seed"]), int(row["epoch"]))
            if key in source:
                raise SystemExit(f"error: {source[key]} and {path} both hold variant {key[0]!r}, seed {key[1]}: "
                                 "give each trial's curve once")
            source[key] = path
            if row["variant"] not in VARIANTS:
                raise SystemExit(f"error: {path} holds variant {row['variant']!r}, which this script does not "
                                 f"define (it knows {', '.join(VARIANTS)})")
            rows.append({"variant": row["variant"], "seed": key[1], "epoch": key[2], METRIC: float(row[METRIC]),
                         UNAVERAGED: float(row.get(UNAVERAGED) or "nan"),
                         "training_minutes": float(row["training_minutes"] or "nan")})
    return rows


def curves_by_trial(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(variant, seed) -> that trial's rows, epoch by epoch."""
    trials = {}
    for row in sorted(rows, key=lambda row: row["epoch"]):
        trials.setdefault((row["variant"], row["seed"]), []).append(row)
    return trials


def summarise(rows: list[dict], variants: dict[str, dict], seeds: list[int]) -> list[dict]:
    """One row per variant: each seed's final validation accuracy, mean, spread, difference from
    the recipe's mean (when the recipe is among them), mean minutes of training and validation,
    and, when a variant keeps a weight average, each seed's score of the weights it averaged."""
    final = {trial: epochs[-1] for trial, epochs in curves_by_trial(rows).items()}
    any_unaveraged = any(not math.isnan(row[UNAVERAGED]) for row in final.values())
    table = []
    for name, changes in variants.items():
        ends = [final.get((name, seed)) for seed in seeds]
        scores = [end[METRIC] if end else math.nan for end in ends]
        done = [score for score in scores if not math.isnan(score)]
        times = [end["training_minutes"] for end in ends if end and not math.isnan(end["training_minutes"])]
        table.append({"variant": name, "changes": " ".join(f"{key}={value}" for key, value in changes.items()) or "—",
                      **{f"seed {seed}": score for seed, score in zip(seeds, scores)},
                      "mean": statistics.fmean(done) if done else math.nan,
                      "spread": max(done) - min(done) if len(done) > 1 else math.nan})
        # The recipe's row comes first, when it is there.
        table[-1]["vs recipe"] = table[-1]["mean"] - table[0]["mean"] if "recipe" in variants else math.nan
        table[-1]["minutes"] = statistics.fmean(times) if times else math.nan
        if any_unaveraged:  # the weights under an average train as the recipe's: the same scores, seed by seed
            table[-1] |= {f"unaveraged seed {seed}": end[UNAVERAGED] if end else math.nan
                          for seed, end in zip(seeds, ends)}
    return table


def format_rows(rows: list[dict]) -> str:
    def cell(key: str, value) -> str:
        if isinstance(value, str):
            return value
        if math.isnan(value):
            return "—"
        if key == "minutes":
            return f"{value:.1f}"
        return f"{100 * value:+.2f}" if key == "vs recipe" else f"{100 * value:.2f}"

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(cell(key, row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(rows: list[dict], names: list[str], seeds: list[int], title: str, path: Path) -> None:
    """Validation accuracy per epoch, a colour per variant: solid the first seed, dashed the rest."""
    trials = curves_by_trial(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, name in enumerate(names):
        for seed in seeds:
            if epochs := trials.get((name, seed)):
                first = seed == seeds[0]
                ax.plot([row["epoch"] for row in epochs], [100 * row[METRIC] for row in epochs], color=f"C{index}",
                        linestyle="-" if first else "--", label=name if first else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_report(rows: list[dict], variants: dict[str, dict], seeds: list[int], title: str, folder: Path) -> list[dict]:
    """The table (table.md, table.csv) and the curves' plot (curves.png) in `folder`; returns the table's rows."""
    summary = summarise(rows, variants, seeds)
    write_text(folder / "table.md", format_rows(summary) + "\n")
    write_csv(folder / "table.csv", summary)
    plot_curves(rows, list(variants), seeds, f"{title}: validation accuracy (solid: seed {seeds[0]}, dashed: the others)",
                folder / "curves.png")
    return summary


def combine(paths: list[Path], folder: Path) -> None:
    """One table and plot of several sittings' curves.csv files, the recipe's row first."""
    rows = read_curves(paths)
    present = {row["variant"] for row in rows}
    variants = {name: changes for name, changes in VARIANTS.items() if name in present}  # the recipe first
    seeds = sorted({row["seed"] for row in rows})
    epochs = max(row["epoch"] for row in rows)
    summary = write_report(rows, variants, seeds, f"{len(paths)} sittings, {epochs} epochs", folder)
    print(f"final validation accuracy (%), seeds {', '.join(map(str, seeds))}, from {len(paths)} files; "
          f"files in {folder}:\n{format_rows(summary)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="fast", help="the recipe: a conf/profile/ name (default: fast)")
    parser.add_argument("--epochs", type=int, default=24, help="each trial's epochs (default: 24)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--without-recipe", action="store_true",
                        help="train only the variants named, to add them to an ablation whose recipe ran before "
                             "with the same seeds on the same kind of CPU or GPU")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another override of the recipe, as `dvc exp run -S` sets it")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="CURVES_CSV",
                        help="train nothing: one table and plot of earlier sittings' curves.csv files")
    parser.add_argument("--out", type=Path, default=Path("reports/ablation/combined"),
                        help="with --combine, the folder for its table and plot (default: reports/ablation/combined)")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.out)
    quiet_libraries()
    names = [*([] if args.without_recipe else ["recipe"]), *(name for name in args.variants if name != "recipe")]
    if not names:
        parser.error("--without-recipe leaves nothing to train: name a variant other than the recipe")
    chosen = {name: VARIANTS[name] for name in names}
    name = sweep_name(args.profile, args.epochs, chosen, args.seeds)
    with failing_in_one_line():
        raw = resolve(DEFAULT_PARAMS, [f"profile={args.profile}", *args.set, f"tune.name={name}",
                                             f"tune.max_epochs={args.epochs}", "tune.early_stopping=false",
                                             "tune.workers_per_trial=1"])
        params = parse_params(raw, "the recipe's params")
        for variant, changes in chosen.items():  # every variant valid before anything trains
            for seed in args.seeds:
                parse_params(trial_raw(raw, {**changes, "train.seed": seed}, params.tune), f"variant {variant!r}")
        print(f"sweep {name}: {len(chosen)} variant{'s' * (len(chosen) > 1)} x {len(args.seeds)} seeds of profile "
              f"{args.profile}, {args.epochs} epochs each ({params.model.preset})", flush=True)
        context = open_sweep(raw, params)
        tuner = build_tuner(trial_trainable(ablation_trial, raw=raw, context=context, variants=chosen), params,
                            context["storage_path"], grid={"variant": names, "seed": args.seeds})
        results = tuner.fit()

    rows = trial_curves(results)
    reports = Path("reports/ablation") / name
    write_csv(reports / "curves.csv", rows)
    summary = write_report(rows, chosen, args.seeds, f"profile {args.profile}, {args.epochs} epochs", reports)
    client = MlflowClient(context["tracking_uri"])
    for artifact in ("table.md", "table.csv", "curves.csv", "curves.png"):
        client.log_artifact(context["parent_run_id"], str(reports / artifact), "ablation")
    for row in summary:
        if not math.isnan(row["mean"]):
            client.log_metric(context["parent_run_id"], f"mean_val_accuracy.{row['variant']}", row["mean"])
    print(f"final validation accuracy (%), {len(args.seeds)} seeds; MLflow parent run {context['parent_run_id']}, "
          f"files in {reports}:\n{format_rows(summary)}")


if __name__ == "__main__":
    main()
