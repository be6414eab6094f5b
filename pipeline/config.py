"""The params that run, validated into typed config before any expensive work starts.

params.yaml is what every stage reads and DVC tracks. It is composed from conf/ by Hydra, the
way `dvc exp run -S` composes it (Hydra is enabled in .dvc/config). One order of precedence,
later wins:

1. built-in defaults: the field defaults below, for whatever the files leave out;
2. conf/config.yaml;
3. the profile: conf/profile/<name>.yaml, chosen by `profile` (`-S profile=paper`);
4. explicit overrides: `-S key=value` given to `dvc exp run`, pipeline/tune.py or
   `python -m pipeline.config`;
5. in a sweep, each trial's epoch budget (no time budget), worker count, validation every
   epoch and sampled values (pipeline/search.py, `sweep_layer`).

Layers 2-4 are Hydra's (`compose`); layer 1 is validation's (`parse_params`); layer 5 is the
sweep's (a mapping merged on top with `deep_merge`). Errors name the key, the value and what is
allowed (ConfigError, one message for all problems).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resattn.cifar10 import IMAGE_SIZE, OFFICIAL_URL, SOURCE_ENV_VAR, redact, secret_parts
from resattn.data import write_text
from resattn.model import model_config
from resattn.training import OPTIMIZERS, SCHEDULES

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml is invalid; the message lists every problem with its key."""


class Section(BaseModel):
    # allow_inf_nan=False: a learning rate of .inf or .nan is a typo, and would train garbage.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataConfig(Section):
    source: str = Field(OFFICIAL_URL, min_length=1)
    checksums: str = "official"
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    validation_size: int = Field(5000, ge=1)
    split_seed: int = Field(0, ge=0)

    @field_validator("source")
    @classmethod
    def _no_credentials(cls, source: str) -> str:
        if found := secret_parts(source):
            raise ValueError(
                f"it carries credentials ({', '.join(found)}), and params are copied into dvc.lock and MLflow: give "
                f"the URL in the {SOURCE_ENV_VAR} environment variable instead (a user:password there is sent as "
                f"HTTP basic authentication, never shown), or use an s3:// source with credentials from the AWS chain")
        return source

    def resolved_source(self) -> str:
        """The environment override wins, for offline or air-gapped machines."""
        return os.environ.get(SOURCE_ENV_VAR) or self.source


class ModelSection(Section):
    preset: str = "attention56_narrow"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> ModelSection:
        model_config(self.preset, **self.build_kwargs())  # raises ValueError naming the bad value
        return self

    def build_kwargs(self) -> dict[str, Any]:
        """The overrides as `create_model` takes them (YAML lists become tuples)."""
        overrides = dict(self.overrides)
        if isinstance(overrides.get("modules_per_stage"), list):
            overrides["modules_per_stage"] = tuple(overrides["modules_per_stage"])
        return overrides


class OptimizerConfig(Section):
    name: Literal[OPTIMIZERS] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    decay_norm_and_bias: bool = True
    norm_and_bias_lr_multiplier: float = Field(1.0, gt=0, description="BN parameters' and biases' learning rate "
                                                                       "over the weights'")


class ScheduleConfig(Section):
    name: Literal[SCHEDULES] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[float] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleConfig:
        if self.name == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs milestones (epochs at which lr is multiplied by gamma)")
        if self.milestones != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones must be positive and increasing; got {self.milestones}")
        if self.name == "onecycle" and self.warmup_epochs == 0:
            raise ValueError("schedule 'onecycle' needs warmup_epochs > 0 (the rising half of the cycle)")
        return self


class ProgressiveResizingConfig(Section):
    start_size: int = Field(0, ge=0, le=IMAGE_SIZE, description="0: off; else the image side of the first epoch, "
                            f"rising in 4 px steps, an equal share of the ramp each, to {IMAGE_SIZE} at full_size_at")
    full_size_at: float = Field(0.75, gt=0, le=1, description="the fraction of the epochs from which every epoch "
                                                               "trains at full size")


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, description="with `minutes`, the most epochs the budget may choose")
    minutes: float | None = Field(
        None, gt=0, description="a time budget for the training loop (epochs and validations; not start-up, "
                                "checkpoints or evaluation): the rates of this machine's step are measured at every "
                                "image side first, then the run trains the most epochs, up to `epochs`, that fit; "
                                "the first epoch's own time corrects the count once (resattn.budget). Sweep "
                                "trials train their epoch budget instead")
    batch_size: int = Field(128, ge=2, description="global: split evenly across workers")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0: off; else a moving average of the weights and BN "
                                                          "statistics, updated every step with this decay, is what "
                                                          "is validated and saved (the weights it averages are "
                                                          "validated too: val_accuracy_unaveraged)")
    alternating_flip: bool = Field(False, description="mirror a fixed half of the images in even epochs and the "
                                                      "other half in odd ones, instead of a coin per image and epoch")
    bn_momentum: float = Field(0.1, gt=0, le=1, description="the weight of each batch in BN's running statistics")
    progressive_resizing: ProgressiveResizingConfig = Field(default_factory=ProgressiveResizingConfig)
    seed: int = Field(0, ge=0)
    train_subset: int = Field(0, ge=0, description="0: every training image")
    num_workers: int | list[int] = Field(
        2, description="a count, or [fewest, most]: an elastic group that goes on with fewer workers when a node is "
                       "lost and grows back when capacity returns")
    elastic_resize_seconds: float = Field(60.0, gt=0, description="how often an elastic run looks for capacity to "
                                                                  "grow into (Ray Train's default)")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="a share of a GPU (0.25: four workers on one GPU); "
                                                                  "below 1 only for one-worker runs, e.g. sweep trials")
    mixed_precision: bool = Field(True, description="bf16 autocast where the hardware computes bf16; fp16 with loss scaling on GPUs without "
                                   "bf16; fp32 on CPUs without it (resattn.training.autocast_dtype)")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the model (minutes of compiling first)")
    cuda_graphs: bool = Field(False, description="capture the whole training step in a CUDA graph and replay it: one "
                                                 "launch a step instead of thousands (one GPU worker, sgd, no compile)")
    sync_batchnorm: bool = Field(False, description="batch norm statistics over all workers' shares (GPUs only)")
    eval_batch_size: int = Field(500, ge=1)
    validate_every: int = Field(1, ge=1, description="validate after every n-th epoch and after the last; sweep "
                                                     "trials validate every epoch, which Tune compares them on")
    max_failures: int = Field(2, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers; the same twice for a fixed group."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        fewest, most = self.num_workers
        return fewest, most

    @property
    def fewest_epochs(self) -> int:
        """The fewest epochs the schedule allows: past its warm-up and its last milestone."""
        return max(1, math.floor(self.schedule.warmup_epochs) + 1,
                   *(math.floor(milestone) + 1 for milestone in self.schedule.milestones))

    @property
    def workers_text(self) -> str:
        fewest, most = self.worker_range
        return str(most) if fewest == most else f"{fewest} to {most}"

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        # The batch rule: batch_size is global, the same for any number of workers, so that an
        # elastic run that loses or regains workers keeps its learning rate and schedule.
        if isinstance(self.num_workers, list) and len(self.num_workers) != 2:
            raise ValueError(f"num_workers {self.num_workers} must be a count or [fewest, most]")
        fewest, most = self.worker_range
        if not 1 <= fewest <= most:
            raise ValueError(f"num_workers {self.num_workers} must be at least 1, and fewest <= most")
        counts = range(fewest, most + 1)
        if any(self.batch_size % count for count in counts):
            multiple = math.lcm(*counts)
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over num_workers {self.workers_text}; "
                f"use a multiple of {multiple}"
            )
        if self.batch_size // most < 2:
            raise ValueError("each worker needs at least 2 images per batch (batch norm)")
        if self.gpus_per_worker < 1 and not self.use_gpu:
            raise ValueError(f"gpus_per_worker {self.gpus_per_worker} needs use_gpu: true")
        if self.gpus_per_worker < 1 and most > 1:
            raise ValueError(f"gpus_per_worker {self.gpus_per_worker} needs num_workers 1: the workers of one run "
                             f"would share a GPU, which NCCL refuses (a share is for sweep trials of one worker)")
        if self.sync_batchnorm and not self.use_gpu:
            raise ValueError("sync_batchnorm needs use_gpu: true (torch synchronises batch norm on GPUs only)")
        if self.cuda_graphs:
            needs = [need for need, met in (("use_gpu: true", self.use_gpu), ("num_workers 1", most == 1),
                                            ("compile: false", not self.compile),
                                            ("optimizer.name sgd", self.optimizer.name == "sgd")) if not met]
            if needs:
                raise ValueError(f"cuda_graphs needs {', '.join(needs)}: the graph holds one GPU's whole step, "
                                 f"with a fused SGD whose learning rate lives on the GPU")
        if self.schedule.name == "step" and self.schedule.milestones[-1] >= self.epochs:
            raise ValueError(f"the last milestone {self.schedule.milestones[-1]} is not before epoch {self.epochs}")
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.schedule.warmup_epochs} must be below epochs {self.epochs}")
        return self


class EvaluateConfig(Section):
    flip_tta: bool = True
    translate_tta: bool = Field(False, description="also average views moved 1 pixel (off until measured at length)")
    batch_size: int = Field(500, ge=1)
    mask_images: int = Field(6, ge=1, le=32)


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = Field("resattn-cifar10", min_length=1)
    registered_model: str = Field("resattn-cifar10", min_length=1)


class RayConfig(Section):
    address: str | None = Field(None, description="None: the cluster of RAY_ADDRESS (a Ray job's), else a new local Ray")
    storage_path: str = "ray_results"
    run_name: str = Field("train", min_length=1)
    dashboard: bool = Field(False, description="a local Ray's dashboard; ignored when joining `address`")


class SearchDimension(Section):
    """One searched parameter: exactly one of `choice`, `uniform` or `loguniform`."""

    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        given = [kind for kind in ("choice", "uniform", "loguniform") if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform; got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice is empty: list at least one value")
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is None:
                continue
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs [low, high] with low < high; got {bounds}")
            if kind == "loguniform" and bounds[0] <= 0:
                raise ValueError(f"loguniform needs low > 0; got {bounds}")
        return self

    def candidates(self) -> list[Any]:
        """The values that bound this dimension: each choice, or the two ends of a range."""
        return list(self.choice if self.choice is not None else (self.uniform or self.loguniform))


class TuneSection(Section):
    name: str = Field("sweep", min_length=1, description="rerunning the same name resumes the sweep")
    num_samples: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    max_epochs: int = Field(3, ge=1, description="ASHA's max_t and every trial's epochs")
    early_stopping: bool = Field(True, description="ASHA; false runs every trial to max_epochs")
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    workers_per_trial: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(0, ge=0, description="0: as many as the cluster fits: each trial holds "
                                       "workers_per_trial CPUs and, with train.use_gpu, as many train.gpus_per_worker "
                                       "shares of a GPU")
    space: dict[str, SearchDimension] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TuneSection:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period {self.grace_period} exceeds max_epochs {self.max_epochs}")
        return self


class Params(Section):
    profile: str = Field("quick-cpu", description="the conf/profile/ file params.yaml was composed with")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _images_fit_the_model(self) -> Params:
        start = self.train.progressive_resizing.start_size
        smallest = model_config(self.model.preset, **self.model.build_kwargs()).min_input_size
        if 0 < start < smallest:
            raise ValueError(f"train.progressive_resizing.start_size {start} is below {smallest}, the smallest image "
                             f"{self.model.preset}'s masks can pool; use 0 (off) or {smallest} to {IMAGE_SIZE}")
        return self


def _format(error: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key (a typo?)"
        given = problem.get("input")
        given = redact(given) if isinstance(given, str) else given  # a credential is never shown
        shown = "" if problem["type"] in ("missing",) or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def parse_params(resolved: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a resolved params mapping (built-in defaults fill what it leaves out)."""
    if not isinstance(resolved, dict):
        raise ConfigError(f"{source} must be a mapping of sections; got {type(resolved).__name__}")
    try:
        return Params.model_validate(resolved)
    except ValidationError as error:
        raise ConfigError(_format(error, source)) from None


def deep_merge(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, mapping by mapping (a sweep trial's layer over the params)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def overlay_for(key: str, value: Any) -> dict:
    """`train.optimizer.lr`, 0.1 -> {"train": {"optimizer": {"lr": 0.1}}}."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def flatten_mapping(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_mapping(value, dotted))
        else:
            flat[dotted] = value
    return flat


# --------------------------------------------------------------------------------------------
# Composition: conf/ and `-S`, as `dvc exp run -S` does it


def config_dir(params_path: Path) -> Path:
    """The Hydra config that composes `params_path`: conf/ beside it."""
    return Path(params_path).resolve().parent / "conf"


def composes(params_path: Path) -> bool:
    """Whether `-S` composes conf/ for this params file, DVC's rule with Hydra enabled: only for
    params.yaml, which DVC writes from conf/; any other file takes `-S` on its own values."""
    return Path(params_path).name == DEFAULT_PARAMS.name and (config_dir(params_path) / "config.yaml").is_file()


ASSIGNMENT = re.compile(r"(\+{1,2}|~)?[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*=.*|~[A-Za-z_][\w.-]*", re.S)


def _hydra_compose(directory: Path, name: str, assignments: list[str], source: str) -> dict[str, Any]:
    for assignment in assignments:
        if not ASSIGNMENT.fullmatch(assignment):
            raise ConfigError(f"-S {assignment!r} is not KEY=VALUE with a dotted key, e.g. train.epochs=3 "
                              f"(+KEY=VALUE adds a key the params lack)")
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(directory.resolve()), version_base=None):
            composed = compose(config_name=name, overrides=list(assignments))
        return OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra's message names the override and what to do; its search-path listing does not help.
        message = str(error).split("\nConfig search path:")[0].strip()
        raise ConfigError(f"{source}: {message}") from None


def compose(assignments: list[str] = (), params_path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """What `dvc exp run -S <assignments>` writes to params.yaml: conf/config.yaml, then the
    profile it chooses (`profile=fast` chooses conf/profile/fast.yaml), then the assignments."""
    directory = config_dir(params_path)
    return _hydra_compose(directory, "config", assignments, f"composing {os.path.relpath(directory)}/")


def load_raw(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params file as a mapping, as written (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return raw


def resolve(path: Path = DEFAULT_PARAMS, assignments: list[str] = ()) -> dict[str, Any]:
    """The params mapping that runs for a params file and `-S` assignments, as `dvc exp run -S`
    resolves them: params.yaml is composed afresh from conf/ with the assignments; any other
    file takes them on its own values. Keys the file lacks need Hydra's `+key=value`."""
    if not assignments:
        return load_raw(path)
    if composes(path):
        return compose(assignments, path)
    raw = load_raw(path)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return _hydra_compose(Path(folder), "params", assignments, f"-S on {path}")


def load_params(path: Path = DEFAULT_PARAMS, assignments: list[str] = ()) -> Params:
    """The validated params that run (`resolve`)."""
    return parse_params(resolve(path, assignments), str(path))


def render(resolved: dict[str, Any]) -> str:
    """params.yaml's text for a resolved mapping, byte for byte as `dvc exp run -S` writes it
    (so a rewrite that changes nothing shows no diff)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.config [--params FILE] [-S key=value ...] [--write]`."""
    parser = argparse.ArgumentParser(
        description="Print the fully resolved params (what would actually run) as YAML. Order of precedence: "
                    "built-in defaults < conf/config.yaml < conf/profile/<profile>.yaml < -S < a sweep's sampled "
                    "values. Without -S: params.yaml as `dvc repro` runs it; with -S: as `dvc exp run -S` would.")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param as `dvc exp run -S` does (e.g. -S profile=fast -S train.epochs=30)")
    parser.add_argument("--write", action="store_true",
                        help="compose conf/ with the -S given and write the result to params.yaml (after editing "
                             "conf/, so that `dvc repro` runs it)")
    args = parser.parse_args(argv)
    try:
        if args.write and not composes(args.params):
            raise ConfigError(f"--write composes conf/config.yaml into params.yaml; {config_dir(args.params)} "
                              f"has no config.yaml or --params is not a params.yaml")
        resolved = compose(args.set, args.params) if args.write else resolve(args.params, args.set)
        parse_params(resolved, str(args.params))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.write:
        write_text(args.params, render(resolved))
        print(f"wrote {args.params} (profile {resolved.get('profile')!r})")
    else:
        print(render(resolved), end="")


if __name__ == "__main__":
    main()
