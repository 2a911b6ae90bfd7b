"""Recipe schema: a strict, typed description of one SWAP (or plain SGD) run.

`sections.py` holds one model per YAML section, `schema.py` the whole `Recipe` and its checks across sections,
`loading.py` reads YAML, applies typed `--set a.b=c` overrides and validates the result; `RecipeError` carries a
one-line message naming the problem and the fix.
"""

from .loading import apply_override, dump_recipe, load_recipe
from .schema import Recipe
from .sections import (
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LossScaleConfig,
    LRConfig,
    ModelConfig,
    OptimizerConfig,
    Phase1Config,
    Phase2Config,
    Phase3Config,
    RecipeError,
    StageConfig,
    Strict,
    TrackingConfig,
)

__all__ = ["AugmentConfig", "CheckpointConfig", "DataConfig", "EvalConfig", "LRConfig", "LossScaleConfig",
           "ModelConfig", "OptimizerConfig", "Phase1Config", "Phase2Config", "Phase3Config", "Recipe", "RecipeError",
           "StageConfig", "Strict", "TrackingConfig", "apply_override", "dump_recipe", "load_recipe"]
