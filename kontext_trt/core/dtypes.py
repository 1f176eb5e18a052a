"""The --dtype names and their torch dtypes, one table for export, quantization, the torch backend and the bench."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The torch backend runs bf16 or fp32: T5 overflows in fp16 (export refuses fp16 for it, see export/export.py).
TORCH_BACKEND_DTYPES = ("bf16", "fp32")
