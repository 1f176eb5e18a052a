"""Every backend this machine has runs the one flow loop to the torch backend's latents (fp32, same seed, 1e-4), and
multi-turn sessions work over each: prompt and input-latent caches, a batch of prompts on one image.

torch (CPU) always; torch on CUDA and TensorRT (engines built here for this GPU) where a GPU is present; onnxruntime
(CPU) where it is installed. A backend this machine lacks is skipped with the reason.
"""
import pytest
import torch

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.runtime.session import EditSession

BACKENDS = ("torch", "torch-cuda", "onnxruntime", "tensorrt")
REQUESTS = [  # (prompts, output size): the image is 80x64 (own size), the engines' sizes below cover both
    (["turn the house red"], (64, 64)),
    (["add a cat", "make it night"], (96, 64)),
]
BATCH = ["add a cat", "make it night"]


def make_request(prompts, size=(None, None), image=None) -> EditRequest:
    image = image if image is not None else im.sample_image(80, 64, seed=3)
    return EditRequest(prompts=prompts, image=image, width=size[0], height=size[1], steps=2, seed=11,
                       auto_resize=False)


def tensorrt_kontext(request, onnx, root):
    """The tiny engines built for this GPU (strict fp32: no TF32) and loaded, or a skip saying what is missing."""
    from kontext_trt.cli.main import main

    request.getfixturevalue("tensorrt_gpu")  # skips without a GPU and the TensorRT flavour that runs it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NVIDIA_TF32_OVERRIDE", "0")  # TF32 (on by default) would cost the 1e-4 parity
        assert main(["build", "--onnx", str(onnx), "--out", str(root), "--sizes", "64x64,80x64,96x64",
                     "--batch", "1-2"]) == 0
    return build_pipeline(LoadSpec(None, backend="tensorrt", engines=root, precision="fp32"))


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="fp32"))


@pytest.fixture(scope="module")
def expected(reference):
    """The torch backend's latents per request, each computed once for every backend."""
    cache = {}

    def latents(prompts, size=(None, None)):
        key = (tuple(prompts), size)
        if key not in cache:
            cache[key] = edit(reference, make_request(prompts, size)).latents
        return cache[key]
    return latents


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_ckpt, reference, tmp_path_factory):
    """A Kontext over one backend (module-wide: loaded once for every test below; torch is the reference itself)."""
    name = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)  # strict fp32 convolutions on CUDA, as on the CPU
        if name == "torch":
            yield reference
        elif name == "torch-cuda":
            if not torch.cuda.is_available():
                pytest.skip("torch-cuda needs a CUDA GPU; this host has none")
            yield build_pipeline(LoadSpec(tiny_ckpt, backend="torch", dtype="fp32", device="cuda"))
        elif name == "onnxruntime":
            pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
            yield build_pipeline(LoadSpec(None, backend="onnxruntime", onnx=request.getfixturevalue("tiny_onnx")))
        else:
            yield tensorrt_kontext(request, request.getfixturevalue("tiny_onnx"), tmp_path_factory.mktemp("engines"))


@pytest.mark.parametrize("prompts,size", REQUESTS)
def test_latents_match_the_torch_backend(backend, reference, expected, prompts, size):
    ours = edit(backend, make_request(prompts, size))
    assert ours.latents.shape == expected(prompts, size).shape
    assert (ours.latents.cpu() - expected(prompts, size)).abs().max().item() < 1e-4
    assert ours.metadata["checkpoint"] == reference.info.checkpoint


def test_session_caches_and_batches(backend, expected):
    image = im.sample_image(80, 64, seed=3)
    session = EditSession(backend, image, steps=2, seed=11, auto_resize=False)
    before = {name: len(backend.times.seconds[name]) for name in ("t5", "vae_encoder", "transformer")}
    first = session.edit(BATCH)  # a batch of two prompts on one image
    again = session.run(make_request(BATCH, image=image))  # same prompts, same image: both caches hit
    second = session.edit("add stars")  # the next turn edits the first output
    calls = {name: len(backend.times.seconds[name]) - n for name, n in before.items()}
    assert calls == {"t5": 2, "vae_encoder": 2, "transformer": 6}
    assert len(first.images) == 2 and session.image is second.images[0] and second.width == 80
    assert (first.latents.cpu() - expected(BATCH)).abs().max().item() < 1e-4
    assert (first.latents - again.latents).abs().max().item() < 1e-6  # the same edit from the cached encodings
