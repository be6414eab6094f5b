"""params.yaml, validated into typed config before any expensive work starts.

One source of truth: every stage and the tuner read their settings through `load_params` (a
sweep through `compose` and `parse_params`). One order of precedence, applied in `compose`
alone; later wins:

1. built-in defaults: the field defaults below;
2. params.yaml's sections (`data`, `model`, `train`, ...), where `dvc exp run -S` writes too;
3. the profile: the entry of `profiles` named by `profile` (`dvc exp run -S profile=paper`);
4. explicit overrides: `-S key=value` given to pipeline/tune.py or `python -m pipeline.config`;
5. in a sweep, each trial's sampled values and epoch budget (pipeline/tune.py).

`dvc exp run -S` edits params.yaml itself, so its values are layer 2: to change a value that
the chosen profile sets, set it in the profile (`-S profiles.fast.train.epochs=30`).
`profile_changes` lists what a profile changed, and every stage prints it.
Errors name the key, the value and what is allowed (ConfigError, one message for all problems).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from resattn.cifar10 import OFFICIAL_URL, SOURCE_ENV_VAR
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


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2, description="global: split evenly across workers")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    train_subset: int = Field(0, ge=0, description="0: every training image")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    mixed_precision: bool = True
    channels_last: bool = False
    eval_batch_size: int = Field(500, ge=1)
    max_failures: int = Field(2, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over num_workers "
                f"{self.num_workers}; use a multiple of {self.num_workers}"
            )
        if self.batch_size // self.num_workers < 2:
            raise ValueError("each worker needs at least 2 images per batch (batch norm)")
        if self.schedule.name == "step" and self.schedule.milestones[-1] >= self.epochs:
            raise ValueError(f"the last milestone {self.schedule.milestones[-1]} is not before epoch {self.epochs}")
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.schedule.warmup_epochs} must be below epochs {self.epochs}")
        return self


class EvaluateConfig(Section):
    flip_tta: bool = True
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
    max_concurrent_trials: int = Field(0, ge=0, description="0: cluster CPUs (or GPUs) // workers_per_trial")
    space: dict[str, SearchDimension] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TuneSection:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period {self.grace_period} exceeds max_epochs {self.max_epochs}")
        return self


class Params(Section):
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    profile: str = "quick-cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tune: TuneSection = Field(default_factory=TuneSection)

    @field_validator("profiles")
    @classmethod
    def _profiles_are_sections(cls, profiles: dict) -> dict:
        for name, overlay in profiles.items():
            for key in overlay or {}:
                if key in ("profile", "profiles"):
                    raise ValueError(f"profile {name!r} cannot set {key!r}")
        return profiles

    @field_validator("profile")
    @classmethod
    def _profile_defined(cls, profile: str, info: ValidationInfo) -> str:
        if "profiles" not in info.data:  # declared first, so validated first: it failed, and says so
            return profile
        profiles = info.data["profiles"]
        if profile not in profiles and profile != "quick-cpu":
            raise ValueError(f"unknown profile {profile!r}; defined: {', '.join(profiles) or 'none'}")
        return profile


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format(error: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key (a typo?)"
        given = problem.get("input")
        shown = "" if problem["type"] in ("missing",) or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


PROFILE_KEYS = ("profile", "profiles")


def profile_selection(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(name, overlay) of the profile that params.yaml's mapping `raw` chooses, or `overrides`
    (`-S profile=fast`). A profile that is not defined, or not a mapping, overlays nothing
    here: validating the composed params reports it, naming the key."""
    selection = deep_merge({key: raw[key] for key in PROFILE_KEYS if key in raw},
                           {key: overrides[key] for key in PROFILE_KEYS if key in (overrides or {})})
    profile = selection.get("profile", "quick-cpu")
    profiles = selection.get("profiles")
    overlay = profiles.get(profile) if isinstance(profiles, dict) else None
    return profile, overlay if isinstance(overlay, dict) else {}


def compose(raw: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "params.yaml") -> dict[str, Any]:
    """The params that run: params.yaml's mapping `raw`, then its profile, then `overrides`
    (the order of precedence of this module's docstring; built-in defaults fill the rest when
    the result is validated). `overrides` may itself choose the profile (`-S profile=fast`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections; got {type(raw).__name__}")
    _, overlay = profile_selection(raw, overrides)
    return deep_merge(deep_merge(raw, overlay), overrides or {})


def profile_changes(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[str]:
    """What the profile changes in the sections of params.yaml's mapping `raw`, as lines
    `profile 'fast' sets train.epochs: 5 -> 24`, leaving out what `overrides` set anyway:
    nothing a profile does goes unsaid."""
    profile, overlay = profile_selection(raw, overrides)
    overridden = flatten_mapping(overrides or {})
    changes = []
    for key, value in flatten_mapping(overlay).items():
        if key in overridden:
            continue
        base: Any = raw
        for part in key.split("."):
            base = base.get(part) if isinstance(base, dict) else None
        if base != value:
            changes.append(f"{key}: {base!r} -> {value!r}" if base is not None else f"{key}: {value!r}")
    return [f"profile {profile!r} sets {change}" for change in changes]


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


def parse_params(resolved: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate params that `compose` resolved (a mapping without a profile validates as is:
    the profile is applied in `compose` alone)."""
    try:
        return Params.model_validate(resolved)
    except ValidationError as error:
        raise ConfigError(_format(error, source)) from None


def overlay_for(key: str, value: Any) -> dict:
    """`train.optimizer.lr`, 0.1 -> {"train": {"optimizer": {"lr": 0.1}}}."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """`["train.epochs=3", "ray.address=auto"]` (as `dvc exp run -S` takes them, values read as
    YAML) -> the nested overlay {"train": {"epochs": 3}, "ray": {"address": "auto"}}."""
    overlay: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {assignment!r} is not KEY=VALUE with a dotted key, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        overlay = deep_merge(overlay, overlay_for(key, value))
    return overlay


def load_raw(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params file as a mapping, as written (no profile applied, not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return raw


def load_params(path: Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """The validated params that run: the file, its profile, then `overrides`."""
    return parse_params(compose(load_raw(path), overrides, str(path)), str(path))


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.config [--params FILE] [-S key=value ...]`: the params that would run."""
    parser = argparse.ArgumentParser(
        description="Print the fully resolved params (what would actually run) as YAML, after the order of "
                    "precedence: built-in defaults < params.yaml < profile < -S < a sweep's sampled values.")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as `dvc exp run -S` does (e.g. -S profile=fast -S train.epochs=30)")
    args = parser.parse_args(argv)
    try:
        raw = load_raw(args.params)
        overrides = parse_assignments(args.set)
        params = parse_params(compose(raw, overrides, str(args.params)), str(args.params))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for line in profile_changes(raw, overrides):
        print(f"# {line}")
    print(yaml.safe_dump(params.model_dump(exclude={"profiles"}), sort_keys=False), end="")


if __name__ == "__main__":
    main()
