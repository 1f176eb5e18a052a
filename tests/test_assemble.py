"""runtime.pipeline assembles every backend the same way (one set of info keys); stages declare optional abilities as
Protocols; a pipeline is changed only through its methods, which leave the original as it was."""
import pytest
import torch

from kontext_trt.assemble import build_pipeline, with_cuda_graphs
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import LoadSpec
from kontext_trt.core.stages import SetsWeights, SupportsGraphCapture, SupportsMemoryStats
from kontext_trt.runtime.flow import EditRequest, PipelineInfo, edit


@pytest.fixture(scope="module")
def torch_k(tiny_ckpt):
    return build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32"))


def request() -> EditRequest:
    return EditRequest(prompts=["add a hat"], image=im.sample_image(64, 64, seed=1), steps=2, auto_resize=False)


def test_info_has_the_same_keys_on_every_backend(torch_k, tiny_ckpt, tiny_onnx):
    ort_k = build_pipeline(LoadSpec(backend="onnxruntime", onnx=tiny_onnx))
    assert torch_k.info == PipelineInfo("torch", "fp32", "fp32", torch_k.info.checkpoint, str(tiny_ckpt))
    assert ort_k.info == PipelineInfo("onnxruntime", "fp32", "fp32", torch_k.info.checkpoint, str(tiny_onnx))
    assert len(torch_k.info.checkpoint) == 16
    assert set(edit(ort_k, request()).metadata) >= set(PipelineInfo.__dataclass_fields__)


def test_stage_abilities_are_protocols(torch_k, tiny_onnx):
    ort_k = build_pipeline(LoadSpec(backend="onnxruntime", onnx=tiny_onnx))
    transformer = torch_k.stages["transformer"]
    assert isinstance(transformer, SetsWeights) and not isinstance(transformer, SupportsGraphCapture)
    assert isinstance(ort_k.stages["transformer"], SupportsGraphCapture)
    assert isinstance(ort_k.stages["transformer"], SetsWeights)
    assert not isinstance(ort_k.stages["transformer"], SupportsMemoryStats)
    assert ort_k.stages["transformer"].graph_refusal() is None  # CPU: nothing to refuse


def test_tensorrt_stage_protocols(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from kontext_trt.engines import trt_api
    from kontext_trt.engines.trt_stages import EnginePool, TrtStage

    stage = TrtStage("transformer", tmp_path / "transformer.plan",
                     EnginePool(trt_api.load_api("tensorrt-rtx"), torch.device("cpu")))
    assert isinstance(stage, SupportsGraphCapture) and isinstance(stage, SupportsMemoryStats)
    assert not isinstance(stage, SetsWeights)


def test_with_stages_leaves_the_pipeline_as_it_was(torch_k):
    calls = []

    def spy(**inputs):
        calls.append(inputs["hidden_states"].shape)
        return torch_k.stages["transformer"](**inputs)

    other = torch_k.with_stages(transformer=spy)
    edit(other, request())
    assert len(calls) == 2 and torch_k.stages["transformer"] is not spy
    assert len(other.times.seconds["transformer"]) == 2 and other.times is not torch_k.times
    done = other.reset_times()
    assert len(done.seconds["transformer"]) == 2 and not other.times.seconds


def test_cuda_graphs_need_a_gpu(torch_k, tiny_ckpt):
    with pytest.raises(KontextError, match="--cuda-graphs replays on a GPU"):
        with_cuda_graphs(torch_k)
    with pytest.raises(KontextError, match="--cuda-graphs replays on a GPU"):
        build_pipeline(LoadSpec(tiny_ckpt, cuda_graphs=True))


@pytest.mark.parametrize("kwargs, message", [
    ({"low_vram": True}, "are TensorRT memory modes: add --engines DIR"),
    ({"precision": "fp8"}, "--precision and --sku pick an engine set"),
    ({"backend": "onnxruntime"}, "--backend onnxruntime needs --onnx DIR"),
    ({"backend": "tensorrt"}, "the TensorRT backend needs --engines DIR"),
    ({"backend": "jax"}, "unknown backend 'jax'"),
    ({"model": None}, "no model given: pass --model CHECKPOINT_DIR"),
])
def test_bad_load_is_one_line(tiny_ckpt, kwargs, message):
    with pytest.raises(KontextError, match=message):
        build_pipeline(LoadSpec(**{"model": tiny_ckpt, **kwargs}))
