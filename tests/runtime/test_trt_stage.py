"""The TensorRT stage without a GPU (stand-in engines and contexts: tests/runtime/conftest.py): I/O, binding and profile
planning, the shared scratch, one context per shape, low VRAM, and TensorRT-RTX's own CUDA graphs."""
import pytest
import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.engines import trt_api, trt_io, trt_pool
from kontext_trt.engines import trt_stages as ts

pytest.importorskip("tensorrt_rtx")
API = trt_api.load_api("tensorrt-rtx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a host without a GPU can do")
def test_cpu_host_builds_but_cannot_deserialize(trt_engines):
    plan = trt_engines / "rtx4090-sm89" / API.folder / "fp32" / "transformer.plan"
    assert trt_api.rtx_header(plan.read_bytes()) == (API.version, (89,))
    with pytest.raises(KontextError, match="does not load with tensorrt-rtx"):
        trt_api.load_engine(API, plan)


def test_engine_io_and_contract(fake_engines):
    specs = trt_io.engine_io(fake_engines.engines["transformer"])
    assert list(specs)[-1] == "latent" and not specs["latent"].is_input and specs["latent"].dtype == torch.float32
    hidden = specs["hidden_states"]
    assert hidden.shape == (-1, -1, 64) and hidden.min == (1, 16, 64) and hidden.max == (2, 48, 64)
    trt_io.check_io("transformer", specs, "transformer.plan")
    with pytest.raises(KontextError, match="is not the vae_decoder stage's"):
        trt_io.check_io("vae_decoder", specs, "transformer.plan")


def test_plan_inputs_casts_in_place_and_checks_the_profile(fake_engines, trt_manifest, transformer_inputs):
    specs = trt_io.engine_io(fake_engines.engines["transformer"])
    inputs = transformer_inputs()
    feeds = trt_io.plan_inputs("transformer", specs, inputs, torch.device("cpu"), trt_manifest.command)
    assert feeds["hidden_states"].dtype == torch.float32  # cast to the engine's dtype
    assert feeds["timestep"] is inputs["timestep"]  # already right: bound as is, no copy
    with pytest.raises(KontextError) as info:
        trt_io.plan_inputs("transformer", specs, transformer_inputs(tokens=64), torch.device("cpu"),
                           trt_manifest.command)
    message = str(info.value)
    assert "hidden_states [2, 64, 64] is outside the engine profile on axis 1 (64 not in 16..48)" in message
    assert "kontext-trt build --onnx" in message and "\n" not in message
    with pytest.raises(KontextError, match="needs input guidance"):
        trt_io.plan_inputs("transformer", specs, {k: v for k, v in inputs.items() if k != "guidance"},
                       torch.device("cpu"))


def test_one_shared_scratch_sized_to_the_largest_engine(fake_engines, trt_manifest, trt_stages, transformer_inputs):
    pool = trt_pool.EnginePool(API, torch.device("cpu"))
    s = trt_stages(pool)
    pool.admit(s["vae_decoder"])  # needs 1 KiB
    _, images = s["vae_decoder"].prepare({"latent": torch.randn(1, 16, 8, 12)})
    assert images["images"].shape == (1, 3, 64, 96) and images["images"].dtype == torch.float32
    pool.admit(s["transformer"])  # needs 4 KiB: the scratch grows and the decoder's context follows it
    inputs = transformer_inputs()
    shaped, outputs = s["transformer"].prepare(inputs)
    ctx = shaped.exec_ctx
    assert pool.scratch_bytes == 4096 and pool.moves == 2
    memory = {c.exec_ctx._memory for st in s.values() for c in st.exec_ctxs.values()}
    assert memory == {(pool.scratch.data_ptr(), 4096)}
    assert all(opts["user_managed"] and opts["eager_kernels"] for opts in fake_engines.contexts)
    assert ctx._shapes["hidden_states"] == (2, 40, 64) and outputs["latent"].shape == (2, 40, 64)
    assert ctx._addresses["latent"] == outputs["latent"].data_ptr()
    assert ctx._addresses["img_ids"] == inputs["img_ids"].data_ptr()  # float32 already: bound in place
    stats = s["transformer"].memory_stats()
    assert stats["shared_scratch_bytes"] == 4096 and stats["scratch_need_bytes"] == 4096 and stats["resident"] == 1
    assert stats["engine_bytes"] == trt_manifest.stages["transformer"]["engine_bytes"]
    assert stats["exec_contexts"] == 1


def test_one_context_per_input_shape(fake_engines, monkeypatch, trt_stages, transformer_inputs):
    monkeypatch.setattr(ts, "MAX_CONTEXTS", 2)
    pool = trt_pool.EnginePool(API, torch.device("cpu"))
    stage = trt_stages(pool)["transformer"]
    pool.admit(stage)
    first = stage.prepare(transformer_inputs(40))[0]
    assert stage.prepare(transformer_inputs(40))[0] is first  # every denoising step: the same context
    assert stage.prepare(transformer_inputs(32))[0] is not first and len(stage.exec_ctxs) == 2
    epoch = stage.graph_epoch
    stage.prepare(transformer_inputs(40, batch=1))  # a third shape drops the least recently used context
    assert len(stage.exec_ctxs) == 2 and stage.graph_epoch != epoch
    assert [dict(k)["hidden_states"] for k in stage.exec_ctxs] == [(2, 32, 64), (1, 40, 64)]


def test_low_vram_keeps_one_engine_and_invalidates_graphs(fake_engines, trt_stages):
    pool = trt_pool.EnginePool(API, torch.device("cpu"), low_vram=True)
    s = trt_stages(pool)
    pool.admit(s["transformer"])
    epoch = s["transformer"].graph_epoch
    pool.admit(s["transformer"])  # every denoising step: already resident, nothing happens
    assert s["transformer"].graph_epoch == epoch and s["transformer"].loads == 1
    pool.admit(s["vae_decoder"])
    assert list(pool.resident) == ["vae_decoder"] and s["transformer"].engine is None
    assert s["transformer"].graph_epoch != epoch and s["transformer"].memory_stats()["resident"] == 0
    pool.admit(s["transformer"])
    assert list(pool.resident) == ["transformer"] and s["transformer"].loads == 2 and pool.mode == "low-vram"



def graphed_transformer(fake_engines, trt_stages, capturable):
    """A transformer stage under CUDA graphs on TensorRT-RTX whose contexts answer is_stream_capturable so."""
    fake_engines.engines["transformer"]._capturable = capturable
    pool = trt_pool.EnginePool(API, torch.device("cpu"))
    return trt_stages(pool, transformer={"cuda_graphs": True})["transformer"]


def test_stream_capturable_is_asked_after_the_first_run(fake_engines, trt_stages, transformer_inputs):
    """A context that is not capturable before its first enqueue but is after keeps torch's graph capture."""
    s = graphed_transformer(fake_engines, trt_stages, "after_run")
    s(**transformer_inputs())
    assert not s.native_graphs and s.graph_refusal() is None
    assert [opts["native_graphs"] for opts in fake_engines.contexts] == [False]


def test_rtx_context_not_capturable_uses_native_graphs_with_fixed_buffers(fake_engines, trt_stages,
                                                                         transformer_inputs):
    s = graphed_transformer(fake_engines, trt_stages, False)
    first = s(**transformer_inputs())  # runs on a plain context, which then says it cannot be captured
    assert s.native_graphs and not s.exec_ctxs and first["latent"].shape == (2, 40, 64)
    assert "TensorRT-RTX captures" in s.graph_refusal()
    inputs = transformer_inputs()
    s(**inputs)
    (shaped,) = s.exec_ctxs.values()
    exec_ctx, bindings = shaped.exec_ctx, shaped.exec_ctx._bindings
    assert fake_engines.contexts[-1]["native_graphs"] and exec_ctx._runs == 1
    addresses = dict(exec_ctx._addresses)
    assert addresses == {name: b.data_ptr() for name, b in shaped.buffers.items()}  # every binding: its own buffer
    for step in range(3):  # every denoising step: copied into the same buffers, nothing re-bound
        inputs = transformer_inputs()
        out = s(**inputs)
        assert exec_ctx._addresses == addresses and exec_ctx._bindings == bindings and exec_ctx._runs == step + 2
        assert torch.equal(shaped.buffers["hidden_states"], inputs["hidden_states"].float())
        assert out["latent"].data_ptr() != shaped.buffers["latent"].data_ptr()  # a copy: the next call overwrites
    s(**transformer_inputs(32))  # another shape: another context with buffers of its own
    assert len(s.exec_ctxs) == 2 and fake_engines.made[-1]._addresses["hidden_states"] != addresses["hidden_states"]


def test_scratch_move_repoints_plain_contexts_and_drops_native_ones(fake_engines, trt_stages, transformer_inputs):
    s = graphed_transformer(fake_engines, trt_stages, False)
    pool = s.pool
    s(**transformer_inputs())
    s(**transformer_inputs())
    decoder = trt_stages(pool)["vae_decoder"]
    pool.admit(decoder)
    decoder.prepare({"latent": torch.randn(1, 16, 8, 12)})
    epoch, native = s.graph_epoch, next(iter(s.exec_ctxs.values()))
    pool.grow_scratch(pool.scratch_bytes)  # no growth: nothing moves, nothing is re-pointed
    assert s.graph_epoch == epoch and next(iter(s.exec_ctxs.values())) is native
    pool.grow_scratch(pool.scratch_bytes + 512)
    assert not s.exec_ctxs and s.graph_epoch != epoch  # RTX's graph held the old scratch: captured afresh later
    (plain,) = decoder.exec_ctxs.values()
    assert plain.exec_ctx._memory == (pool.scratch.data_ptr(), pool.scratch_bytes)
