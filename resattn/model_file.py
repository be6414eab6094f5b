"""The trained-model file: weights with the config that built them, nothing else.

    save_model(path, model.state_dict(), model.config, preset="attention56_narrow")
    model = load_model(path)            # rebuilt from the stored config, ready for eval

A file rebuilds its network from the `ResidualAttentionConfig` it stores, as nanoGPT does from
`model_args`, never from the preset registry: editing or removing a preset leaves every saved
model loading as it was trained. The preset name is kept for people reading the file. Loading
never unpickles code (`weights_only`).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch

from resattn.data import write_bytes
from resattn.model import ResidualAttentionConfig, ResidualAttentionNet

FORMAT = 2  # 1: files before this module, which stored `config` beside `preset` and `overrides`


def save_model(path: Path, state_dict: dict[str, torch.Tensor], config: ResidualAttentionConfig,
               preset: str | None = None) -> None:
    """Write the file atomically: a crash leaves the previous file or none, never half of one."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "config": dataclasses.asdict(config), "preset": preset, "model": state_dict}, buffer)
    write_bytes(path, buffer.getvalue())


def load_config(saved: dict, path: Path) -> ResidualAttentionConfig:
    """The config a loaded file stores; ValueError naming the file if it is not a model file."""
    fields = {field.name for field in dataclasses.fields(ResidualAttentionConfig)}
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or "model" not in saved:
        raise ValueError(f"{path} is not a resattn model file (no weights and config); it may be a training "
                         f"checkpoint or another program's file")
    if unknown := set(config) - fields:
        raise ValueError(f"{path} was saved by a newer resattn (config fields {sorted(unknown)} unknown here); "
                         f"upgrade resattn to load it")
    return ResidualAttentionConfig(**config)  # format 1 stored the same fields


def load_model(path: Path) -> ResidualAttentionNet:
    """The network of a model file, in eval mode, on the CPU."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such model file; run the train stage first (dvc repro train)") from None
    except Exception as error:  # noqa: BLE001 - truncated, corrupted, or not a torch file at all
        raise ValueError(f"{path} is not a readable model file ({type(error).__name__}: "
                         f"{(str(error).strip().splitlines() or [''])[0][:160]})") from None
    model = ResidualAttentionNet(load_config(saved, path))
    model.load_state_dict(saved["model"])
    return model.eval()
