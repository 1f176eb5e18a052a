"""BFL's published Kontext ONNX as `build --onnx` input, made here from our tiny export rewritten into its layout:
clip.opt, t5.opt (int32 input_ids), transformer.opt/bf16 (a bf16 graph: bf16 timestep), vae.opt (the decoder),
vae_encoder.opt, no manifest. Built with TensorRT-RTX on this host; the runtime casts inputs to each binding's dtype."""
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kontext_trt.core.onnx_dir import read_onnx_dir
from kontext_trt.engines import build, cache, onnx_cast, trt_api, trt_io
from kontext_trt.engines.profiles import Shapes
from kontext_trt.engines.skus import SKUS

RTX = trt_api.load_api("tensorrt-rtx")
BFL = {"clip": "clip.opt", "t5": "t5.opt", "transformer": "transformer.opt/bf16", "vae_decoder": "vae.opt",
       "vae_encoder": "vae_encoder.opt"}


def int32_ids(model: onnx.ModelProto) -> None:
    """input_ids taken as int32 (BFL's text encoders), cast to int64 inside the graph."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["input_ids_int64" if name == "input_ids" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["input_ids"], ["input_ids_int64"], to=TensorProto.INT64))
    next(v for v in graph.input if v.name == "input_ids").type.tensor_type.elem_type = TensorProto.INT32


@pytest.fixture(scope="module")
def bfl_onnx(tiny_onnx, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("FLUX.1-Kontext-dev-onnx")
    for stage, folder in BFL.items():
        model = onnx.load(str(tiny_onnx / stage / "model.onnx"))
        if stage in ("clip", "t5"):
            int32_ids(model)
        if stage == "transformer":
            onnx_cast.cast_graph(model.graph, TensorProto.FLOAT, TensorProto.BFLOAT16)
        (root / folder).mkdir(parents=True)
        onnx_cast.save(model, root / folder / "model.onnx")
    return root


def test_bfl_layout_is_recognised(bfl_onnx):
    found = read_onnx_dir(bfl_onnx)
    assert found.layout == "bfl" and found.manifest is None and set(found.stages) == set(BFL)
    assert found.pick("transformer", "bf16").dtypes["timestep"] == "bfloat16"
    assert found.pick("clip", None).dtypes["input_ids"] == "int32"
    assert found.pick("vae_decoder", None).path.parent.name == "vae.opt"
    graphs = found.describe()
    transformer = graphs["stages"]["transformer"]["bf16"]
    assert graphs["layout"] == "bfl" and transformer["file"] == "transformer.opt/bf16/model.onnx"
    assert [(o["name"], o["dtype"]) for o in transformer["outputs"]] == [("latent", "bfloat16")]


def test_build_from_bfl_layout_and_cast_inputs_per_binding(bfl_onnx, tmp_path):
    folder, done = build.build_set(build.BuildRequest(
        onnx_dir=bfl_onnx, out=tmp_path, sku=SKUS["rtx4090"], target=build.Target("tensorrt-rtx", (89,)),
        precision="bf16", shapes=Shapes(((64, 64),), (1, 2))))
    assert folder == tmp_path / "rtx4090-sm89" / RTX.folder / "bf16" and sorted(done) == sorted(BFL)
    manifest = cache.read_engine_manifest(folder)
    assert manifest.onnx["graphs"]["layout"] == "bfl" and manifest.checkpoint_fingerprint is None
    stages = manifest.stages
    assert stages["clip"]["inputs"]["input_ids"]["dtype"] == "int32"
    assert stages["transformer"]["inputs"]["timestep"]["dtype"] == "bfloat16"
    assert stages["vae_decoder"]["onnx_file"].endswith("vae.opt/model.onnx")
    for stage in ("clip", "transformer"):  # the runtime reads each binding's dtype and casts the loop's tensors to it
        net = trt_api.parse_onnx(RTX, bfl_onnx / BFL[stage] / "model.onnx").network
        specs = {}
        for t in map(net.get_input, range(net.num_inputs)):
            profile = stages[stage]["profile"][t.name]
            specs[t.name] = trt_io.TensorSpec(t.name, True, trt_io.TORCH_DTYPES[t.dtype.name], tuple(t.shape),
                                              tuple(profile["min"]), tuple(profile["max"]))
        inputs = {name: torch.zeros(profile["opt"], dtype=torch.int64 if name == "input_ids" else torch.float32)
                  for name, profile in stages[stage]["profile"].items()}
        feeds = trt_io.plan_inputs(stage, specs, inputs, torch.device("cpu"))
        if stage == "clip":
            assert feeds["input_ids"].dtype == torch.int32
        else:
            assert feeds["timestep"].dtype == feeds["hidden_states"].dtype == torch.bfloat16
