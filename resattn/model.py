"""Residual Attention Network for 32x32 images (Wang et al., CVPR 2017, arXiv:1704.06904).

Read top to bottom: the residual unit, the soft mask branch, the attention module, the
network, then the preset registry and the one constructor, `create_model`.

Where the paper is silent we follow the official Caffe release (fwang91/residual-attention-
network, `Attention-56-deploy.prototxt`):
- every unit is a pre-activation bottleneck of width C/4 with the stride on its 3x3 conv and a
  1x1 projection of the pre-activated input when the shape changes;
- the mask branch starts from the output of the p pre-processing units, like the trunk;
- on its way down it max-pools 3x3/2 and runs r units per level, and a skip unit taps every
  level but the lowest; on its way up it resizes bilinearly to the skip's size (Caffe's Interp
  layer, i.e. align_corners=True), adds the skip and runs r units; back at the trunk's size it
  ends in BN-ReLU-1x1, BN-ReLU-1x1 and the mask activation;
- the lowest level runs two units, whatever r is. The paper defines r as the units "between
  adjacent pooling layers"; the lowest level lies between a pooling and an up-sampling layer,
  and the official (r=1) model puts two units there. Reading that pair as 2r instead would make
  Attention-452 (r=3) 10.3M parameters against the paper's 8.6M; the fixed pair gives 8.1M,
  and both readings give the same Attention-56 to -236 (README, "Model zoo");
- the three stages pool 3, 2 and 1 times so that every mask bottoms out at the same size
  (7x7 on ImageNet). On CIFAR the stages run at 32, 16 and 8 px and all masks bottom out at 4x4.

CIFAR network (paper section 4.1): 3x3 conv stem of 16 channels, three stages at widths 64,
128 and 256 (ResNet-164's widths, which give the paper's CIFAR parameter counts), each a
residual unit (stride 2 for stages 2 and 3) followed by its attention modules, three more units,
BN-ReLU, global average pooling and a linear classifier. Depth = 36m + 20 for p, t, r = 1, 2, 1
and m modules per stage.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("residual", "naive")
MASK_ACTIVATIONS = ("mixed", "channel", "spatial")
STAGE_STRIDES = (1, 2, 2)
MASK_POOLS_PER_STAGE = (3, 2, 1)
BASE_STEM_WIDTH = 16
BASE_STAGE_WIDTHS = (64, 128, 256)
BOTTLENECK_DIVISOR = 4
FINAL_UNITS = 3
MASK_BOTTOM_UNITS = 2


# --------------------------------------------------------------------------------------------
# Building blocks


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck unit (He et al., ECCV 2016), used by every branch."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        mid = out_channels // BOTTLENECK_DIVISOR
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        needs_projection = stride != 1 or in_channels != out_channels
        self.projection = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if needs_projection
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU on a BN output is safe (BN's backward needs its input, not its output)
        # and saves one activation-sized buffer per BN, as torchvision's ResNet does.
        preact = F.relu(self.bn1(x), inplace=True)
        shortcut = x if self.projection is None else self.projection(preact)
        out = self.conv1(preact)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        return out + shortcut


def residual_units(channels: int, count: int) -> nn.Sequential:
    """`count` shape-preserving units; zero units is the identity."""
    return nn.Sequential(*(ResidualUnit(channels, channels) for _ in range(count)))


def mixed_attention(logits: torch.Tensor) -> torch.Tensor:
    """Paper eq. (f1): a sigmoid per channel and position."""
    return torch.sigmoid(logits)


def channel_attention(logits: torch.Tensor) -> torch.Tensor:
    """Paper eq. (f2): L2 normalisation over channels at each position."""
    return F.normalize(logits, p=2.0, dim=1)


def spatial_attention(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Paper eq. (f3): each channel standardised over positions, then a sigmoid."""
    mean = logits.mean(dim=(2, 3), keepdim=True)
    std = logits.std(dim=(2, 3), keepdim=True, unbiased=False)
    return torch.sigmoid((logits - mean) / (std + eps))


MASK_ACTIVATION_FUNCTIONS = {
    "mixed": mixed_attention,
    "channel": channel_attention,
    "spatial": spatial_attention,
}


def _resize_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # Caffe's Interp layer (DeepLab) maps corner pixels onto corner pixels: align_corners=True.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class SoftMaskBranch(nn.Module):
    """Bottom-up top-down mask M(x) with the trunk's shape (paper section 3.3, figure 3)."""

    def __init__(self, channels: int, r: int, num_pools: int, activation: str) -> None:
        super().__init__()
        self.down = nn.ModuleList(
            residual_units(channels, MASK_BOTTOM_UNITS if level == num_pools else r)
            for level in range(1, num_pools + 1)
        )
        self.skips = nn.ModuleList(
            ResidualUnit(channels, channels) for _ in range(num_pools - 1)
        )
        self.up = nn.ModuleList(residual_units(channels, r) for _ in range(num_pools - 1))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.activation = MASK_ACTIVATION_FUNCTIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        skips = []
        for level, units in enumerate(self.down):
            out = units(F.max_pool2d(out, kernel_size=3, stride=2, padding=1))
            if level < len(self.skips):
                skips.append(self.skips[level](out))
        for units, skip in zip(self.up, reversed(skips)):
            out = units(_resize_to(out, skip.shape[-2:]) + skip)
        return self.activation(self.head(_resize_to(out, x.shape[-2:])))


class AttentionModule(nn.Module):
    """p units, then trunk T (t units) and soft mask M side by side, merged, then p units.

    Attention residual learning (paper eq. 3): H = (1 + M(x)) * T(x). The naive variant,
    H = M(x) * T(x), is the paper's ablation (table 3) and degrades with depth.
    """

    def __init__(
        self,
        channels: int,
        *,
        p: int,
        t: int,
        r: int,
        num_pools: int,
        attention: str,
        mask_activation: str,
    ) -> None:
        super().__init__()
        self.pre = residual_units(channels, p)
        self.trunk = residual_units(channels, t)
        self.mask = SoftMaskBranch(channels, r, num_pools, mask_activation)
        self.post = residual_units(channels, p)
        self.residual_attention = attention == "residual"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask(x)
        if self.residual_attention:
            # (1 + M) * T computed as T + M * T: one fused kernel, no (1 + M) temporary.
            merged = torch.addcmul(trunk, mask, trunk)
        else:
            merged = mask * trunk
        return self.post(merged)


# --------------------------------------------------------------------------------------------
# Configuration


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ResidualAttentionConfig:
    """Everything that defines a network; validated on construction (ValueError)."""

    modules_per_stage: tuple[int, int, int] = (1, 1, 1)
    p: int = 1
    t: int = 2
    r: int = 1
    width_multiplier: float = 1.0
    attention: str = "residual"
    mask_activation: str = "mixed"
    num_classes: int = 10
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        modules = self.modules_per_stage
        if _is_int(modules):
            modules = (modules,) * len(BASE_STAGE_WIDTHS)
        if isinstance(modules, (str, bytes)) or not isinstance(modules, Sequence):
            raise ValueError(
                f"modules_per_stage must be a list of {len(BASE_STAGE_WIDTHS)} integers "
                f"(attention modules in each stage) or one integer for all stages; "
                f"got {modules!r}"
            )
        modules = tuple(modules)
        if len(modules) != len(BASE_STAGE_WIDTHS) or not all(_is_int(m) for m in modules):
            raise ValueError(
                f"modules_per_stage must hold exactly {len(BASE_STAGE_WIDTHS)} integers, one "
                f"per stage; got {list(modules)!r}"
            )
        if any(m < 0 for m in modules) or sum(modules) == 0:
            raise ValueError(
                f"modules_per_stage must be >= 0 in every stage with at least one attention "
                f"module in all; got {list(modules)!r}"
            )
        object.__setattr__(self, "modules_per_stage", modules)

        for name, minimum, meaning in (
            ("p", 0, "pre- and post-processing units around the trunk/mask split"),
            ("t", 1, "units in the trunk branch"),
            ("r", 1, "units between adjacent pooling layers in the mask branch"),
            ("num_classes", 1, "outputs of the classifier"),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} ({meaning}) must be an integer >= {minimum}; got {value!r}")

        if isinstance(self.width_multiplier, bool) or not isinstance(
            self.width_multiplier, (int, float)
        ) or not math.isfinite(self.width_multiplier) or self.width_multiplier <= 0:
            raise ValueError(
                f"width_multiplier must be a positive number; got {self.width_multiplier!r}"
            )
        widths = self.stage_widths
        if any(w % BOTTLENECK_DIVISOR for w in widths) or self.stem_width < 1:
            raise ValueError(
                f"width_multiplier {self.width_multiplier} gives stage widths {list(widths)}; "
                f"each must be a positive multiple of {BOTTLENECK_DIVISOR} so the bottleneck "
                f"(C/{BOTTLENECK_DIVISOR}) divides it evenly. Use a multiplier w with 64*w a "
                f"multiple of 4, e.g. 0.25, 0.5, 1, 2"
            )
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose one of: {', '.join(ATTENTION_KINDS)}"
            )
        if self.mask_activation not in MASK_ACTIVATIONS:
            raise ValueError(
                f"unknown mask_activation {self.mask_activation!r}; choose one of: "
                f"{', '.join(MASK_ACTIVATIONS)}"
            )
        if not isinstance(self.zero_init_residual, bool):
            raise ValueError(f"zero_init_residual must be true or false; got {self.zero_init_residual!r}")

    @property
    def stem_width(self) -> int:
        return round(BASE_STEM_WIDTH * self.width_multiplier)

    @property
    def stage_widths(self) -> tuple[int, int, int]:
        return tuple(round(w * self.width_multiplier) for w in BASE_STAGE_WIDTHS)

    @property
    def depth(self) -> int:
        """Weight layers along the trunk path, as the paper counts them (36m + 20 at 1,2,1)."""
        layers_per_module = 3 * (2 * self.p + self.t)
        return layers_per_module * sum(self.modules_per_stage) + 20

    @property
    def min_input_size(self) -> int:
        """Smallest image side for which every mask pools to at least one pixel."""
        downsampling = 0
        deepest = 0
        for stride, pools in zip(STAGE_STRIDES, MASK_POOLS_PER_STAGE):
            downsampling += int(math.log2(stride))
            deepest = max(deepest, downsampling + pools)
        return 2**deepest


# --------------------------------------------------------------------------------------------
# The network


class ResidualAttentionNet(nn.Module):
    def __init__(self, config: ResidualAttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Conv2d(3, config.stem_width, 3, padding=1, bias=False)
        in_channels = config.stem_width
        stages = []
        for index, (width, stride, pools, modules) in enumerate(
            zip(config.stage_widths, STAGE_STRIDES, MASK_POOLS_PER_STAGE, config.modules_per_stage),
            start=1,
        ):
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            blocks["unit"] = ResidualUnit(in_channels, width, stride)
            for m in range(1, modules + 1):
                blocks[f"attention{m}"] = AttentionModule(
                    width,
                    p=config.p,
                    t=config.t,
                    r=config.r,
                    num_pools=pools,
                    attention=config.attention,
                    mask_activation=config.mask_activation,
                )
            stages.append((f"stage{index}", nn.Sequential(blocks)))
            in_channels = width
        self.stages = nn.Sequential(OrderedDict(stages))
        self.final_units = residual_units(in_channels, FINAL_UNITS)
        self.final_norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Linear(in_channels, config.num_classes)
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al. 2015, fan-in as Caffe's "msra" filler that the paper's code used.
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        if self.config.zero_init_residual:
            # Pre-activation units end in a conv, not a BN: zeroing a BN weight would feed
            # relu(0) to that conv, and ReLU passes no gradient at 0, so the unit would never
            # learn. Zeroing the last conv makes each unit start as the identity and still
            # receives gradient (Goyal et al. 2017's trick, applied at the right place).
            for module in self.modules():
                if isinstance(module, ResidualUnit):
                    nn.init.zeros_(module.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch of RGB images (N, 3, H, W); got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.config.min_input_size:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} is too small: the masks pool up to "
                f"{max(MASK_POOLS_PER_STAGE)} times after the stage strides, which needs at "
                f"least {self.config.min_input_size}x{self.config.min_input_size} pixels"
            )
        out = self.final_units(self.stages(self.stem(x)))
        out = F.relu(self.final_norm(out), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def attention_modules(self) -> Iterator[tuple[str, AttentionModule]]:
        for name, module in self.named_modules():
            if isinstance(module, AttentionModule):
                yield name, module

    @torch.no_grad()
    def attention_masks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each attention module's soft mask M(x) for a batch, keyed by module name.

        Hooks exist only for the duration of this call, so the ordinary forward pass pays
        nothing for visualisation. Put the model in eval mode first for inference statistics.
        """
        masks: dict[str, torch.Tensor] = {}
        handles = [
            module.mask.register_forward_hook(
                lambda _module, _inputs, output, name=name: masks.__setitem__(name, output)
            )
            for name, module in self.attention_modules()
        ]
        try:
            self(x)
        finally:
            for handle in handles:
                handle.remove()
        return masks


# --------------------------------------------------------------------------------------------
# Presets and the constructor


@dataclass(frozen=True)
class Preset:
    config: ResidualAttentionConfig
    description: str
    paper_params_millions: float | None = None
    paper_cifar10_error: float | None = None


PRESETS: dict[str, Preset] = {}


def _register(
    name: str,
    description: str,
    *,
    paper_params: float | None = None,
    paper_error: float | None = None,
    **config,
) -> None:
    PRESETS[name] = Preset(ResidualAttentionConfig(**config), description, paper_params, paper_error)


# Paper figures on CIFAR-10: parameters (millions) from table 4, top-1 error (%) from table 4, or
# from table 3 (attention residual learning) for the depths that table 4 does not list.
_register("attention56", "Attention-56: m=1 per stage, p,t,r=1,2,1", paper_error=5.52, modules_per_stage=1)
_register(
    "attention92", "Attention-92: m=2 per stage, p,t,r=1,2,1",
    paper_params=1.9, paper_error=4.99, modules_per_stage=2,
)
_register("attention128", "Attention-128: m=3 per stage, p,t,r=1,2,1", paper_error=4.44, modules_per_stage=3)
_register("attention164", "Attention-164: m=4 per stage, p,t,r=1,2,1", paper_error=4.31, modules_per_stage=4)
_register(
    "attention236", "Attention-236: m=6 per stage, p,t,r=1,2,1",
    paper_params=5.1, paper_error=4.14, modules_per_stage=6,
)
_register(
    "attention452", "Attention-452: m=6 per stage, p,t,r=2,4,3",
    paper_params=8.6, paper_error=3.90, modules_per_stage=6, p=2, t=4, r=3,
)
# Narrow variants for CPU work: the paper's topology at a fraction of its widths.
_register(
    "attention56_narrow", "Attention-56 at half width (stem 8, stages 32/64/128), for CPU runs",
    modules_per_stage=1, width_multiplier=0.5,
)
_register(
    "attention56_tiny", "Attention-56 at quarter width (stem 4, stages 16/32/64), for tests",
    modules_per_stage=1, width_multiplier=0.25,
)

CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(ResidualAttentionConfig))


def list_presets() -> list[str]:
    return list(PRESETS)


def model_config(preset: str, **overrides) -> ResidualAttentionConfig:
    """The validated config of `preset` with `overrides` applied (ValueError if invalid)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown model override(s) {', '.join(unknown)}; valid ones: {', '.join(CONFIG_FIELDS)}"
        )
    return dataclasses.replace(PRESETS[preset].config, **overrides)


def create_model(preset: str, **overrides) -> ResidualAttentionNet:
    """Build a preset, e.g. `create_model("attention92", num_classes=100, r=2)`."""
    return ResidualAttentionNet(model_config(preset, **overrides))
