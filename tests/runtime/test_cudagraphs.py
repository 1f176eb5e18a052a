"""The CUDA-graph wrapper: bookkeeping on any host with a fake capture backend; replay vs eager on a CUDA machine."""
import time

import pytest
import torch

from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.runtime.cudagraphs import GRAPHED_STAGES, GraphedStage, graphed, signature
from kontext_trt.runtime.flow import EditRequest, edit


class FakeGraphs:
    """Capture backend without CUDA: a 'graph' re-runs the captured call and writes into the captured outputs."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.warm_ups, self.replays = fail, 0, 0

    def warm_up(self, call):
        self.warm_ups += 1
        call()

    def capture(self, call):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = call()

        def handle():
            for name, tensor in call().items():
                outputs[name].copy_(tensor)
        return handle, outputs

    def replay(self, handle):
        self.replays += 1
        handle()


class Stage:
    """y = 2x + t, counting its calls; graph_epoch and graph_refusal settable like a TensorRT stage's."""

    def __init__(self, refusal: str | None = None) -> None:
        self.calls, self.graph_epoch, self.refusal = 0, 0, refusal

    def __call__(self, x, t):
        self.calls += 1
        if x.shape[1] > 4:
            raise KontextError("x outside the engine profile")
        return {"y": 2 * x + t}

    def graph_refusal(self):
        return self.refusal


def inputs(n: int, value: float = 1.0) -> dict:
    return {"x": torch.full((1, n), value), "t": torch.tensor([0.5])}


def test_replays_match_eager_and_capture_once_per_shape():
    stage, backend = Stage(), FakeGraphs()
    g = GraphedStage(stage, backend=backend)
    for value in (1.0, 2.0, 3.0):  # same signature, new values: the static inputs are refreshed each call
        out = g(**inputs(3, value))["y"]
        assert torch.equal(out, 2 * torch.full((1, 3), value) + 0.5)
    assert g.stats()["captures"] == 1 and g.stats()["replays"] == 3 and backend.warm_ups == 1
    assert list(g.graphs) == [signature(inputs(3))]


def test_unchanged_inputs_are_not_copied_again():
    g = GraphedStage(Stage(), backend=FakeGraphs())
    t = torch.tensor([0.5])
    g(x=torch.ones(1, 3), t=t)
    static = next(iter(g.graphs.values())).inputs["t"]
    before = static._version
    g(x=torch.ones(1, 3), t=t)
    assert static._version == before  # same tensor, unmodified: no copy
    t.add_(1.0)
    assert torch.equal(g(x=torch.ones(1, 3), t=t)["y"], torch.full((1, 3), 3.5))  # modified in place: copied
    assert static._version == before + 1


def test_lru_bound_evicts_the_least_recently_used_shape():
    g = GraphedStage(Stage(), max_graphs=2, backend=FakeGraphs())
    g(**inputs(1))
    g(**inputs(2))
    g(**inputs(1))  # 1 is now the most recent
    g(**inputs(3))  # evicts 2
    assert [k[1][1] for k in g.graphs] == [(1, 1), (1, 3)] and g.stats()["evictions"] == 1
    g(**inputs(2))
    assert g.stats()["captures"] == 4


def test_epoch_change_drops_every_graph():
    stage = Stage()
    g = GraphedStage(stage, backend=FakeGraphs())
    g(**inputs(1))
    g(**inputs(2))
    stage.graph_epoch += 1  # engine reloaded or its scratch moved
    assert torch.equal(g(**inputs(1, 4.0))["y"], torch.full((1, 1), 8.5))
    assert g.stats() == {"captures": 3, "replays": 3, "eager": 0, "evictions": 0, "invalidations": 1, "graphs": 1,
                         "refusals": []}


def test_epoch_change_during_a_warm_up_drops_the_other_graphs():
    """A new shape's warm-up can free what older graphs replay (a TensorRT stage dropping another shape's context)."""
    stage = Stage()
    g = GraphedStage(stage, backend=FakeGraphs())
    g(**inputs(1))
    real_call = Stage.__call__

    def call_dropping_a_context(self, x, t):
        if x.shape[1] == 2 and self.graph_epoch == 0:
            self.graph_epoch += 1
        return real_call(self, x, t)
    stage.__class__ = type("DroppingStage", (Stage,), {"__call__": call_dropping_a_context})
    g(**inputs(2))
    assert list(g.graphs) == [signature(inputs(2))] and g.stats()["invalidations"] == 1
    g(**inputs(1))  # recaptured against the stage as it is now, not replayed from before
    assert g.stats()["captures"] == 3 and g.stats()["replays"] == 3


def test_refused_or_failed_capture_runs_eagerly():
    stage = Stage(refusal="the execution context is not stream capturable")
    g = GraphedStage(stage, backend=FakeGraphs())
    assert torch.equal(g(**inputs(2, 1.0))["y"], torch.full((1, 2), 2.5))
    g(**inputs(2, 1.0))
    assert g.stats()["eager"] == 2 and g.stats()["refusals"] == [stage.refusal] and g.stats()["graphs"] == 0
    failing = GraphedStage(Stage(), backend=FakeGraphs(fail=True))
    assert torch.equal(failing(**inputs(2, 2.0))["y"], torch.full((1, 2), 4.5))
    assert failing.stats()["refusals"] == ["capture failed: operation not permitted when stream is capturing"]


def test_stage_errors_are_not_swallowed():
    g = GraphedStage(Stage(), backend=FakeGraphs())
    with pytest.raises(KontextError, match="outside the engine profile"):
        g(**inputs(5))


def test_graphed_wraps_the_transformer_only():
    stages = graphed({name: Stage() for name in ("clip", "transformer", "transformer_body", "vae_decoder")})
    assert GRAPHED_STAGES == ("transformer", "transformer_head", "transformer_body", "transformer_tail")
    assert isinstance(stages["transformer"], GraphedStage) and isinstance(stages["transformer_body"], GraphedStage)
    assert not isinstance(stages["clip"], GraphedStage) and not isinstance(stages["vae_decoder"], GraphedStage)


def host_ms_per_call(stage, feeds: dict, calls: int = 20) -> float:
    """Host milliseconds to issue one call (no synchronisation between calls)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        stage(**feeds)
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * seconds / calls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs capture and replay on one")
def test_replayed_edit_matches_eager_and_costs_less_host_time(tiny_ckpt):
    from kontext_trt.assemble import build_pipeline, with_cuda_graphs
    from kontext_trt.core.specs import LoadSpec

    k = build_pipeline(LoadSpec(tiny_ckpt, dtype="fp32", device="cuda"))
    req = EditRequest(prompts=["add a cat", "make it night"], image=im.sample_image(80, 64, seed=3), width=96,
                      height=64, steps=4, seed=11, auto_resize=False)
    eager = edit(k, req)
    kg = with_cuda_graphs(k)
    first, second = edit(kg, req), edit(kg, req)  # the second edit replays the graph the first captured
    graphs = kg.graphs["transformer"].stats()
    assert graphs["captures"] == 1 and graphs["replays"] == 2 * req.steps and graphs["eager"] == 0
    for result in (first, second):
        assert (result.latents - eager.latents).abs().max().item() < 1e-3
    from kontext_trt.benchmarks.transformer_step import preset_config, step_inputs

    feeds = step_inputs(preset_config("tiny"), 1, 24, 24, torch.device("cuda"))
    eager_ms = host_ms_per_call(k.stages["transformer"], feeds)
    graphed_ms = host_ms_per_call(kg.graphs["transformer"], feeds)
    print(f"\nper-step host time: eager {eager_ms:.3f} ms, graph replay {graphed_ms:.3f} ms")
    assert graphed_ms < eager_ms
