"""Floor 0, shared facts: errors, atomic files, constants, dtype tables, images, tokenizing, the stage I/O
contract, checkpoint and manifest reading. Imports nothing else of kontext_trt."""
