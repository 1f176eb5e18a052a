"""The `kontext-trt` console script: argparse in, typed values out, one call into the floors below."""
