import os
import sys
from pathlib import Path

import torch

# Triton's interpreter must be chosen before triton is first imported: on a machine without a
# GPU every kernel test runs on the CPU through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests import their float64 SPEC definitions as a plain module
sys.path.insert(0, str(Path(__file__).parent))
