"""Recipe schema: a strict, typed description of one SWAP (or plain SGD) run.

`sections.py` holds one model per YAML section, `schema.py` the whole `Recipe` and its checks across sections,
`loading.py` reads YAML, applies typed `--set a.b=c` overrides and validates the result; `RecipeError` carries a
one-line message naming the problem and the fix.
"""

from .loading import dump_recipe, load_recipe
from .schema import Recipe
from .sections import (
    AugmentConfig,
    DataConfig,
    LossScaleConfig,
    LRConfig,
    OptimizerConfig,
    Phase1Config,
    Phase2Config,
    RecipeError,
    StageConfig,
    TrackingConfig,
)

# What the rest of the package, the tests and the benchmarks import; every other section model is reached through
# Recipe's fields, or from .sections.
__all__ = ["AugmentConfig", "DataConfig", "LRConfig", "LossScaleConfig", "OptimizerConfig", "Phase1Config",
           "Phase2Config", "Recipe", "RecipeError", "StageConfig", "TrackingConfig", "dump_recipe", "load_recipe"]
