"""The TensorRT stage's memory without a GPU (stand-ins: tests/runtime/conftest.py): weight-streaming budgets (auto
included), engines that allocate their own scratch, scratch growth and the out-of-memory errors."""
import pytest
import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import parse_budget
from kontext_trt.engines import trt_api, trt_pool
from kontext_trt.engines import trt_stages as ts

pytest.importorskip("tensorrt_rtx")
API = trt_api.load_api("tensorrt-rtx")


def test_weight_streaming_budget(fake_engines, trt_stages):
    pool = trt_pool.EnginePool(API, torch.device("cpu"), streaming=True)
    with pytest.raises(KontextError) as info:
        pool.admit(trt_stages(pool, transformer={"weight_budget": 2**30})["transformer"])
    assert "built with --weight-streaming" in str(info.value) and str(info.value).endswith("--weight-streaming")
    fake_engines.engines["transformer"].streamable_weights_size = 10_000
    s = trt_stages(pool, transformer={"weight_budget": 2**30})["transformer"]
    pool.admit(s)
    assert fake_engines.engines["transformer"].weight_streaming_budget_v2 == 10_000  # clamped to what streams
    assert s.memory_stats()["weight_streaming_budget_bytes"] == 10_000


@pytest.mark.parametrize("free,budget", [(2**30 + 4096 + 3_000, 3_000), (2**31, 10_000), (2**30, 0)])
def test_auto_weight_streaming_budget_is_what_fits(fake_engines, monkeypatch, free, budget, trt_stages):
    """auto: free device memory less the engine's scratch (4096 here) and AUTO_HEADROOM, within 0..streamable."""
    monkeypatch.setattr(ts, "device_memory", lambda device: (free, 8 * 2**30))
    fake_engines.engines["transformer"].streamable_weights_size = 10_000
    s = trt_stages(trt_pool.EnginePool(API, torch.device("cpu")), transformer={"weight_budget": "auto"})
    s["transformer"].pool.admit(s["transformer"])
    assert s["transformer"].budget_bytes == budget == fake_engines.engines["transformer"].weight_streaming_budget_v2


def test_refused_weight_streaming_budget(fake_engines, trt_stages):
    engine = fake_engines.engines["transformer"]
    engine.streamable_weights_size = 10_000
    type(engine).weight_streaming_budget_v2 = property(lambda self: -1, lambda self, value: None)  # setter ignored
    try:
        s = trt_stages(trt_pool.EnginePool(API, torch.device("cpu")), transformer={"weight_budget": 5_000})
        with pytest.raises(KontextError, match="the engine refused a weight-streaming budget of 5000 bytes"):
            s["transformer"].pool.admit(s["transformer"])
    finally:
        del type(engine).weight_streaming_budget_v2


def test_scratch_growth_out_of_memory_unloads_before_retrying(fake_engines, monkeypatch, trt_stages):
    pool = trt_pool.EnginePool(API, torch.device("cpu"))
    s = trt_stages(pool)
    pool.admit(s["vae_decoder"])
    old, real = pool.scratch, pool.allocate
    failures = iter([True])

    def allocate(need):
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(need)
    monkeypatch.setattr(pool, "allocate", allocate)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    pool.grow_scratch(pool.scratch_bytes + 1)  # the larger buffer fits only once the old one and the decoder are gone
    assert pool.scratch is not old and pool.scratch_bytes == old.numel() + 1
    assert not pool.resident and s["vae_decoder"].engine is None and not s["vae_decoder"].exec_ctxs


def test_out_of_memory_names_the_mode_to_try(fake_engines, monkeypatch, trt_stages):
    def no_room(api, path):
        raise KontextError(f"{path} does not load: [defaultAllocator.cpp] Error Code 1: Cuda Runtime (out of memory)")

    monkeypatch.setattr(trt_api, "load_engine", no_room)
    for pool, hint in ((trt_pool.EnginePool(API, torch.device("cpu")), "try --low-vram"),
                       (trt_pool.EnginePool(API, torch.device("cpu"), low_vram=True), "add --weight-streaming-budget"),
                       (trt_pool.EnginePool(API, torch.device("cpu"), streaming=True),
                        "smaller --weight-streaming-budget")):
        with pytest.raises(KontextError) as info:
            pool.admit(trt_stages(pool)["transformer"])
        message = str(info.value)
        assert message.startswith("out of device memory loading the transformer engine") and hint in message
    pool = trt_pool.EnginePool(API, torch.device("cpu"))
    with pytest.raises(KontextError, match="out of device memory running"), pool.oom_guard("running the t5 engine"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert trt_pool.is_oom("cudaErrorMemoryAllocation") and not trt_pool.is_oom("engine plan is malformed")


def test_budget_argument():
    assert parse_budget("8GiB") == 8 * 2**30 and parse_budget("512m") == 512 * 2**20
    assert parse_budget("1000") == 1000 and parse_budget("auto") == "auto"
    with pytest.raises(Exception, match="is not a size"):
        parse_budget("lots")



def test_auto_budget_lowered_when_the_streaming_scratch_grows(fake_engines, trt_stages, monkeypatch):
    """Streaming adds scratch (here 2000 bytes once anything streams): the first budget no longer fits beside it, so
    it is lowered until budget + scratch + headroom fit in what was free."""
    free = ts.AUTO_HEADROOM + 4096 + 9_000
    monkeypatch.setattr(ts, "device_memory", lambda device: (free, 8 * 2**30))
    engine = fake_engines.engines["transformer"]
    engine.streamable_weights_size, engine._streaming_scratch = 10_000, lambda budget: 2_000 if budget < 10_000 else 0
    s = trt_stages(trt_pool.EnginePool(API, torch.device("cpu")), transformer={"weight_budget": "auto"})
    s["transformer"].pool.admit(s["transformer"])
    budget, need = s["transformer"].budget_bytes, s["transformer"].scratch_need
    assert budget == engine.weight_streaming_budget_v2 == 7_000 and need == 6_096
    assert budget + need + ts.AUTO_HEADROOM <= free


def test_rtx_streaming_engine_allocates_its_own_scratch(fake_engines, trt_stages, transformer_inputs):
    """A TensorRT-RTX engine built with weight streaming takes no user allocation: its contexts are made with the
    library's own memory, never pointed at the shared scratch, and the scratch is not grown for it."""
    fake_engines.engines["transformer"].streamable_weights_size = 10_000
    pool = trt_pool.EnginePool(API, torch.device("cpu"), streaming=True)
    s = trt_stages(pool, transformer={"weight_budget": 5_000})
    pool.admit(s["vae_decoder"])
    pool.admit(s["transformer"])
    shaped, _ = s["transformer"].prepare(transformer_inputs())
    assert fake_engines.contexts[-1]["user_managed"] is False and shaped.exec_ctx._memory is None
    assert pool.scratch_bytes == 1024 and s["transformer"].memory_stats()["own_scratch"] == 1
    pool.grow_scratch(2048)  # the shared scratch moves: the streaming engine's context is not touched
    assert shaped.exec_ctx._memory is None and s["transformer"].exec_ctxs


def test_built_for_streaming_but_nothing_streams(fake_engines, trt_stages):
    """An engine built with --weight-streaming whose weights all stay resident: say so, not 'rebuild it'."""
    pool = trt_pool.EnginePool(API, torch.device("cpu"), streaming=True)
    s = trt_stages(pool, transformer={"weight_budget": 0})["transformer"]
    s.rebuild += " --weight-streaming"
    with pytest.raises(KontextError, match="was built with --weight-streaming but has no streamable weights"):
        pool.admit(s)
