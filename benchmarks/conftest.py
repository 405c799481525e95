import os

import torch

# Same rule as tests/: without a GPU the Triton provider runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
