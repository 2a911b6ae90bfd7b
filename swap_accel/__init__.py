"""swap_accel: Stochastic Weight Averaging in Parallel (Gupta et al., ICLR 2020) on HF Accelerate.

Importing the package registers the DAWNBench ResNet-9 in timm's model registry as `resnet9`.
"""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers resnet9 with timm)
