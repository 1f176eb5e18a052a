"""The TensorRT stage without a GPU: I/O, binding and profile planning, shared scratch, memory modes, error paths.

A CPU host builds TensorRT-RTX plans but cannot deserialize them (the runtime needs a CUDA driver), so the engine
here is a stand-in exposing ICudaEngine's I/O surface from what this host does know of the built engine: its
TensorRT-RTX network (tensor names, dtypes, dynamic axes) and the profile the engine manifest records.
"""
import shutil
from types import SimpleNamespace

import pytest
import torch

from kontext_trt.engines import build, cache, device as gpus, trt_api
from kontext_trt.engines.profiles import Shapes
from kontext_trt.engines.skus import SKUS
from kontext_trt.runtime import commands, image as im, trt_stages as ts
from kontext_trt.runtime.cli import main
from kontext_trt.runtime.errors import KontextError
from kontext_trt.runtime.flow import EditRequest

pytest.importorskip("tensorrt_rtx")
API = trt_api.load_api("tensorrt-rtx")
SIZES = ((64, 64), (96, 64))  # 16 and 24 tokens: the transformer takes 16..48 image tokens


@pytest.fixture(scope="module")
def engines(tiny_onnx, tmp_path_factory):
    """ENGINES root with the five tiny stages built for the RTX 4090 on this CPU host, for SIZES and batch 1-2."""
    root = tmp_path_factory.mktemp("engines")
    build.build_set(build.BuildRequest(onnx_dir=tiny_onnx, out=root, sku=SKUS["rtx4090"],
                                       target=build.Target("tensorrt-rtx", (89,)), shapes=Shapes(SIZES, (1, 2))))
    return root


@pytest.fixture(scope="module")
def manifest(engines):
    return cache.read_manifest(engines / "rtx4090-sm89" / API.folder / "fp32")


class FakeEngine:
    """ICudaEngine's I/O surface from the stage's TensorRT-RTX network and the engine manifest's profile."""

    def __init__(self, onnx_path, entry: dict, scratch: int = 4096, streamable: int = 0) -> None:
        net = trt_api.parse_onnx(API, onnx_path).network
        tensors = [*map(net.get_input, range(net.num_inputs)), *map(net.get_output, range(net.num_outputs))]
        self.io = {t.name: (t.is_network_input, t.dtype, tuple(t.shape)) for t in tensors}
        self.profile, self.device_memory_size_v2, self.streamable_weights_size = entry["profile"], scratch, streamable
        self.weight_streaming_budget_v2, self.num_io_tensors, self.capturable = -1, len(self.io), True

    def get_tensor_name(self, index):
        return list(self.io)[index]

    def get_tensor_mode(self, name):
        return API.trt.TensorIOMode.INPUT if self.io[name][0] else API.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_profile_shape(self, name, index):
        return [self.profile[name][key] for key in ("min", "opt", "max")]



class FakeContext:
    """An execution context that records what the stage sets and infers the two stages' output shapes."""

    def __init__(self, engine, capturable: bool = True) -> None:
        self.engine, self.capturable, self.shapes, self.addresses, self.memory = engine, capturable, {}, {}, None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        if name == "latent":
            return self.shapes["hidden_states"]
        b, _, h, w = self.shapes["latent"]
        return (b, 3, 8 * h, 8 * w)

    def is_stream_capturable(self, stream):
        return self.capturable


@pytest.fixture
def fake_engines(tiny_onnx, manifest, monkeypatch):
    """Plans 'load' as FakeEngines (transformer: 4 KiB scratch, decoder: 1 KiB); contexts are FakeContexts."""
    made = {"transformer": FakeEngine(tiny_onnx / "transformer/model.onnx", manifest["stages"]["transformer"], 4096),
            "vae_decoder": FakeEngine(tiny_onnx / "vae_decoder/model.onnx", manifest["stages"]["vae_decoder"], 1024)}
    calls = []

    def create_context(api, engine, runtime_cache=None, **options):
        calls.append(options)
        return trt_api.Context(FakeContext(engine, engine.capturable))

    monkeypatch.setattr(trt_api, "load_engine", lambda api, path: made[path.stem])
    monkeypatch.setattr(trt_api, "create_context", create_context)
    return SimpleNamespace(engines=made, contexts=calls)


def stages(engines, manifest, pool, **kw):
    folder = engines / "rtx4090-sm89" / API.folder / "fp32"
    return {name: ts.TrtStage(name, folder / f"{name}.plan", pool, rebuild=manifest["command"], **kw.get(name, {}))
            for name in ("transformer", "vae_decoder")}


def transformer_inputs(tokens: int = 40, batch: int = 2) -> dict:
    return {"hidden_states": torch.randn(batch, tokens, 64, dtype=torch.float64),
            "encoder_hidden_states": torch.randn(batch, 512, 32), "pooled_projections": torch.randn(batch, 32),
            "timestep": torch.full((batch,), 0.5), "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3),
            "guidance": torch.full((batch,), 2.5)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a host without a GPU can do")
def test_cpu_host_builds_but_cannot_deserialize(engines):
    plan = engines / "rtx4090-sm89" / API.folder / "fp32" / "transformer.plan"
    assert trt_api.rtx_header(plan.read_bytes()) == (API.version, (89,))
    with pytest.raises(KontextError, match="does not load with tensorrt-rtx"):
        trt_api.load_engine(API, plan)


def test_engine_io_and_contract(fake_engines, manifest):
    specs = ts.engine_io(fake_engines.engines["transformer"])
    assert list(specs)[-1] == "latent" and not specs["latent"].is_input and specs["latent"].dtype == torch.float32
    hidden = specs["hidden_states"]
    assert hidden.shape == (-1, -1, 64) and hidden.min == (1, 16, 64) and hidden.max == (2, 48, 64)
    ts.check_io("transformer", specs, "transformer.plan")
    with pytest.raises(KontextError, match="is not the vae_decoder stage's"):
        ts.check_io("vae_decoder", specs, "transformer.plan")


def test_plan_inputs_casts_in_place_and_checks_the_profile(fake_engines, manifest):
    specs = ts.engine_io(fake_engines.engines["transformer"])
    inputs = transformer_inputs()
    feeds = ts.plan_inputs("transformer", specs, inputs, torch.device("cpu"), manifest["command"])
    assert feeds["hidden_states"].dtype == torch.float32  # cast to the engine's dtype
    assert feeds["timestep"] is inputs["timestep"]  # already right: bound as is, no copy
    with pytest.raises(KontextError) as info:
        ts.plan_inputs("transformer", specs, transformer_inputs(tokens=64), torch.device("cpu"), manifest["command"])
    message = str(info.value)
    assert "hidden_states [2, 64, 64] is outside the engine profile on axis 1 (64 not in 16..48)" in message
    assert "kontext-trt build --onnx" in message and "\n" not in message
    with pytest.raises(KontextError, match="needs input guidance"):
        ts.plan_inputs("transformer", specs, {k: v for k, v in inputs.items() if k != "guidance"},
                       torch.device("cpu"))


def test_one_shared_scratch_sized_to_the_largest_engine(fake_engines, engines, manifest):
    pool = ts.EnginePool(API, torch.device("cpu"))
    s = stages(engines, manifest, pool)
    pool.admit(s["vae_decoder"])  # needs 1 KiB
    _, _, images = s["vae_decoder"].prepare({"latent": torch.randn(1, 16, 8, 12)})
    assert images["images"].shape == (1, 3, 64, 96) and images["images"].dtype == torch.float32
    pool.admit(s["transformer"])  # needs 4 KiB: the scratch grows and the decoder's context follows it
    ctx, feeds, outputs = s["transformer"].prepare(transformer_inputs())
    assert pool.scratch_bytes == 4096 and pool.moves == 2
    memory = {c.context.memory for st in s.values() for c in st.contexts.values()}
    assert memory == {(pool.scratch.data_ptr(), 4096)}
    assert all(opts["user_managed"] and opts["eager_kernels"] for opts in fake_engines.contexts)
    assert ctx.shapes["hidden_states"] == (2, 40, 64) and outputs["latent"].shape == (2, 40, 64)
    assert ctx.addresses["latent"] == outputs["latent"].data_ptr()
    assert ctx.addresses["img_ids"] == feeds["img_ids"].data_ptr()
    stats = s["transformer"].memory_stats()
    assert stats["shared_scratch_bytes"] == 4096 and stats["scratch_need_bytes"] == 4096 and stats["resident"] == 1
    assert stats["engine_bytes"] == manifest["stages"]["transformer"]["engine_bytes"] and stats["contexts"] == 1


def test_one_context_per_input_shape(fake_engines, engines, manifest, monkeypatch):
    monkeypatch.setattr(ts, "MAX_CONTEXTS", 2)
    pool = ts.EnginePool(API, torch.device("cpu"))
    stage = stages(engines, manifest, pool)["transformer"]
    pool.admit(stage)
    first = stage.prepare(transformer_inputs(40))[0]
    assert stage.prepare(transformer_inputs(40))[0] is first  # every denoising step: the same context
    assert stage.prepare(transformer_inputs(32))[0] is not first and len(stage.contexts) == 2
    epoch = stage.graph_epoch
    stage.prepare(transformer_inputs(40, batch=1))  # a third shape drops the least recently used context
    assert len(stage.contexts) == 2 and stage.graph_epoch != epoch
    assert [dict(k)["hidden_states"] for k in stage.contexts] == [(2, 32, 64), (1, 40, 64)]


def test_low_vram_keeps_one_engine_and_invalidates_graphs(fake_engines, engines, manifest):
    pool = ts.EnginePool(API, torch.device("cpu"), low_vram=True)
    s = stages(engines, manifest, pool)
    pool.admit(s["transformer"])
    epoch = s["transformer"].graph_epoch
    pool.admit(s["transformer"])  # every denoising step: already resident, nothing happens
    assert s["transformer"].graph_epoch == epoch and s["transformer"].loads == 1
    pool.admit(s["vae_decoder"])
    assert list(pool.resident) == ["vae_decoder"] and s["transformer"].engine is None
    assert s["transformer"].graph_epoch != epoch and s["transformer"].memory_stats()["resident"] == 0
    pool.admit(s["transformer"])
    assert list(pool.resident) == ["transformer"] and s["transformer"].loads == 2 and pool.mode == "low-vram"


def test_weight_streaming_budget(fake_engines, engines, manifest):
    pool = ts.EnginePool(API, torch.device("cpu"), streaming=True)
    with pytest.raises(KontextError) as info:
        pool.admit(stages(engines, manifest, pool, transformer={"weight_budget": 2**30})["transformer"])
    assert "built with --weight-streaming" in str(info.value) and str(info.value).endswith("--weight-streaming")
    fake_engines.engines["transformer"].streamable_weights_size = 10_000
    s = stages(engines, manifest, pool, transformer={"weight_budget": 2**30})["transformer"]
    pool.admit(s)
    assert fake_engines.engines["transformer"].weight_streaming_budget_v2 == 10_000  # clamped to what streams
    assert s.memory_stats()["weight_streaming_budget_bytes"] == 10_000



@pytest.mark.parametrize("free,budget", [(2**30 + 4096 + 3_000, 3_000), (2**31, 10_000), (2**30, 0)])
def test_auto_weight_streaming_budget_is_what_fits(fake_engines, engines, manifest, monkeypatch, free, budget):
    """auto: free device memory less the engine's scratch (4096 here) and AUTO_HEADROOM, within 0..streamable."""
    monkeypatch.setattr(ts, "device_memory", lambda device: (free, 8 * 2**30))
    fake_engines.engines["transformer"].streamable_weights_size = 10_000
    s = stages(engines, manifest, ts.EnginePool(API, torch.device("cpu")), transformer={"weight_budget": "auto"})
    s["transformer"].pool.admit(s["transformer"])
    assert s["transformer"].budget_bytes == budget == fake_engines.engines["transformer"].weight_streaming_budget_v2


def test_refused_weight_streaming_budget(fake_engines, engines, manifest):
    engine = fake_engines.engines["transformer"]
    engine.streamable_weights_size = 10_000
    type(engine).weight_streaming_budget_v2 = property(lambda self: -1, lambda self, value: None)  # setter ignored
    try:
        s = stages(engines, manifest, ts.EnginePool(API, torch.device("cpu")), transformer={"weight_budget": 5_000})
        with pytest.raises(KontextError, match="the engine refused a weight-streaming budget of 5000 bytes"):
            s["transformer"].pool.admit(s["transformer"])
    finally:
        del type(engine).weight_streaming_budget_v2


def test_scratch_growth_out_of_memory_unloads_before_retrying(fake_engines, engines, manifest, monkeypatch):
    pool = ts.EnginePool(API, torch.device("cpu"))
    s = stages(engines, manifest, pool)
    pool.admit(s["vae_decoder"])
    old, real = pool.scratch, pool.allocate
    failures = iter([True])

    def allocate(need):
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(need)
    monkeypatch.setattr(pool, "allocate", allocate)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    pool.fit(pool.scratch_bytes + 1)  # the larger buffer fits only once the old one and the decoder are gone
    assert pool.scratch is not old and pool.scratch_bytes == old.numel() + 1
    assert not pool.resident and s["vae_decoder"].engine is None and not s["vae_decoder"].contexts


def test_rtx_context_not_capturable_uses_native_graphs(fake_engines, engines, manifest):
    fake_engines.engines["transformer"].capturable = False
    pool = ts.EnginePool(API, torch.device("cpu"))
    pool.stream = SimpleNamespace(cuda_stream=7)
    s = stages(engines, manifest, pool, transformer={"cuda_graphs": True})["transformer"]
    pool.admit(s)
    s.prepare(transformer_inputs())
    assert s.native_graphs and fake_engines.contexts[-1]["native_graphs"]
    assert "TensorRT-RTX captures" in s.graph_refusal()


def test_out_of_memory_names_the_mode_to_try(fake_engines, engines, manifest, monkeypatch):
    def no_room(api, path):
        raise KontextError(f"{path} does not load: [defaultAllocator.cpp] Error Code 1: Cuda Runtime (out of memory)")

    monkeypatch.setattr(trt_api, "load_engine", no_room)
    for pool, hint in ((ts.EnginePool(API, torch.device("cpu")), "try --low-vram"),
                       (ts.EnginePool(API, torch.device("cpu"), low_vram=True), "add --weight-streaming-budget"),
                       (ts.EnginePool(API, torch.device("cpu"), streaming=True), "smaller --weight-streaming-budget")):
        with pytest.raises(KontextError) as info:
            pool.admit(stages(engines, manifest, pool)["transformer"])
        message = str(info.value)
        assert message.startswith("out of device memory loading the transformer engine") and hint in message
    pool = ts.EnginePool(API, torch.device("cpu"))
    with pytest.raises(KontextError, match="out of device memory running"), pool.oom_guard("running the t5 engine"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert ts.is_oom("cudaErrorMemoryAllocation") and not ts.is_oom("engine plan is malformed")


def test_request_geometry():
    image = im.sample_image(80, 64)
    assert ts.request_geometry(EditRequest(prompts=["a", "b"], image=image, auto_resize=False)) == \
        ts.Geometry(80, 64, 2, (80, 64))
    assert ts.request_geometry(EditRequest(prompts=["a"], image=image, width=96, height=64, auto_resize=False)) == \
        ts.Geometry(96, 64, 1, (80, 64))
    assert ts.request_geometry(EditRequest(prompts=["a"])) == ts.Geometry(1024, 1024, 1, None)


def test_default_geometry_is_the_sets_opt_edit(engines):
    assert ts.default_geometry(engines / "rtx4090-sm89" / API.folder / "fp32") == ts.Geometry(96, 64, 1, (96, 64))


def test_tokenizers_and_config_come_from_the_export(manifest, tiny_ckpt, tmp_path):
    clip, t5, config = ts.text_side(manifest, None, None)
    assert clip.model_max_length and config.latent_channels == 16
    gone = {**manifest, "onnx": {**manifest["onnx"], "dir": str(tmp_path / "moved")}}
    with pytest.raises(KontextError, match="pass --onnx EXPORT_DIR or --model CHECKPOINT"):
        ts.text_side(gone, None, None)
    assert ts.text_side(gone, None, tiny_ckpt)[2] == config


def test_budget_argument():
    assert commands.budget_bytes("8GiB") == 8 * 2**30 and commands.budget_bytes("512m") == 512 * 2**20
    assert commands.budget_bytes("1000") == 1000 and commands.budget_bytes("auto") == "auto"
    with pytest.raises(Exception, match="is not a size"):
        commands.budget_bytes("lots")


def edit_error(capsys, engines, tmp_path, *extra) -> str:
    code = main(["edit", "--engines", str(engines), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                 "--width", "64", "--height", "64", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a host without a GPU")
def test_cli_without_gpu(capsys, engines, tmp_path):
    assert "runs TensorRT engines on an NVIDIA GPU and none is usable here" in edit_error(capsys, engines, tmp_path)


@pytest.fixture
def rtx(monkeypatch):
    """Pretend this host has an RTX GPU (NVML and torch say so); returns a setter for the GPU."""
    def use(name: str, sm: int) -> None:
        monkeypatch.setattr(gpus, "detect_gpu", lambda: (gpus.Gpu(name, sm, 24.0, 0), ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return use


def test_cli_engines_for_another_gpu(capsys, engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 5090", 120)
    err = edit_error(capsys, engines, tmp_path)
    assert f"no engines for rtx5090-sm120/{API.folder}/bf16" in err and "rebuild: kontext-trt build" in err


def test_cli_engines_for_another_version(capsys, engines, tmp_path, rtx, monkeypatch):
    rtx("NVIDIA GeForce RTX 4090", 89)
    newer = trt_api.TrtApi("tensorrt-rtx", SimpleNamespace(__version__="1.8.0.1"))

    def load_api(flavor):
        if flavor != "tensorrt-rtx":
            raise KontextError(f"{flavor} is not installed")
        return newer
    monkeypatch.setattr(trt_api, "load_api", load_api)
    err = edit_error(capsys, engines, tmp_path)
    assert "no engines for rtx4090-sm89/tensorrt-rtx-1.8.0.1/bf16" in err
    assert f"built here: rtx4090-sm89/{API.folder}/fp32 (sizes 64x64,96x64" in err


def test_cli_size_outside_the_engines(capsys, engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 4090", 89)
    err = edit_error(capsys, engines, tmp_path, "--width", "128", "--height", "128")
    assert "transformer L=64 outside 16..48" in err and "--sizes 64x64,96x64,128x128" in err


def test_cli_memory_modes_need_engines(capsys, tiny_ckpt, tmp_path):
    code = main(["edit", "--model", str(tiny_ckpt), "--low-vram", "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "are TensorRT memory modes: add --engines DIR" in capsys.readouterr().err
    code = main(["edit", "--model", str(tiny_ckpt), "--cuda-graphs", "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--cuda-graphs replays on a GPU" in capsys.readouterr().err


def test_cli_precision_the_gpu_lacks(capsys, engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 4090", 89)
    err = edit_error(capsys, engines, tmp_path, "--precision", "nvfp4")
    assert "RTX 4090 cannot run nvfp4 engines: nvfp4 needs compute capability sm100" in err
    assert "(--precision fp8)" in err


def test_cli_several_precisions_built(capsys, engines, tmp_path, rtx):
    rtx("NVIDIA GeForce RTX 4090", 89)
    root = tmp_path / "engines"
    shutil.copytree(engines, root)
    base = root / "rtx4090-sm89" / API.folder
    shutil.copytree(base / "fp32", base / "fp8")
    assert f"{base} holds engine sets in fp32, fp8: pass --precision to pick one" in edit_error(capsys, root, tmp_path)
    assert cache.pick_precision(base, "fp8") == "fp8" and cache.pick_precision(base / "none", None) == "bf16"
    shutil.rmtree(base / "fp8")
    assert cache.pick_precision(base, None) == "fp32"


def test_cli_sku_of_another_architecture(capsys, engines, tmp_path, rtx):
    rtx("NVIDIA H100 NVL", 90)
    assert "is not in the SKU table: pass --sku NAME" in edit_error(capsys, engines, tmp_path)
    err = edit_error(capsys, engines, tmp_path, "--sku", "rtx4090")
    assert "--sku rtx4090 engines are for sm89 and this GPU (NVIDIA H100 NVL) is sm90" in err
    err = edit_error(capsys, engines, tmp_path, "--sku", "h100-sxm")  # same architecture: its engines are looked up
    assert "no engines for h100-sxm-sm90/" in err


def test_cli_engine_selection_needs_engines(capsys, tiny_ckpt, tmp_path):
    code = main(["edit", "--model", str(tiny_ckpt), "--precision", "fp8", "--prompt", "x",
                 "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--precision and --sku pick an engine set: add --engines DIR" in capsys.readouterr().err
