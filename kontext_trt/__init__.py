"""kontext-trt: FLUX.1 Kontext [dev] on TensorRT, onnxruntime or torch behind one pipeline.

    from kontext_trt import KontextPipeline

    pipe = KontextPipeline.load("ckpt")                 # or engines="engines/", or onnx="onnx/"
    image = pipe(prompt="add a hat", image="cat.png").images[0]
"""

__all__ = ["KontextPipeline"]


def __getattr__(name: str):
    """Import the pipeline on first use, so `import kontext_trt.<folder>` stays as light as that folder."""
    if name == "KontextPipeline":
        from kontext_trt.pipeline import KontextPipeline

        return KontextPipeline
    raise AttributeError(f"module 'kontext_trt' has no attribute {name!r}")
