"""resattn: the Residual Attention Network (Wang et al., CVPR 2017) on CIFAR-10.

This package is the torch-only core (model, data, augmentation, training step, metrics); it
never imports Ray, MLflow or DVC, so it runs and benchmarks anywhere torch does.
"""

from resattn.model import (
    PRESETS,
    ResidualAttentionConfig,
    ResidualAttentionNet,
    create_model,
    list_presets,
    model_config,
)

__all__ = [
    "PRESETS",
    "ResidualAttentionConfig",
    "ResidualAttentionNet",
    "create_model",
    "list_presets",
    "model_config",
]
