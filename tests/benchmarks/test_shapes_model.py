"""The shipped shapes model through `eval`'s scoring: a floor under what it measured (see README: the issue's bars
are not met yet), so a change that breaks editing on a trained model fails here; and the demo's edit."""
from kontext_trt.assemble import build_pipeline
from kontext_trt.benchmarks.shapes_eval import evaluate
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, edit
from kontext_trt.shapes.read import score
from kontext_trt.shapes.scenes import demo_edit, render


def test_trained_model_edits_held_out_scenes(shapes_ckpt):
    k = build_pipeline(LoadSpec(shapes_ckpt, backend="torch", dtype="fp32"))
    result = evaluate(k, n=32, seed=0, steps=28)
    assert result["n"] == 32 and len(result["records"]) == 32
    # run 5, shipped: 43.8% over these 32 (14 edits; run 4 had 11 here) and 61.5% over 200; random weights score 0
    assert result["accuracy_all"] >= 0.375
    assert result["untouched_psnr_db"]["mean"] >= 28.0  # 32.7 dB over 200 when shipped


def test_the_demo_edit_comes_out_right(shapes_ckpt):
    demo = demo_edit()
    assert demo.kind == "recolour" and len(demo.source) == 2  # a scene where the instruction picks one of two shapes
    k = build_pipeline(LoadSpec(shapes_ckpt, backend="torch", dtype="fp32"))
    result = edit(k, EditRequest(prompts=[demo.prompt], image=render(demo.source), steps=28, auto_resize=False))
    verdict = score(demo, result.images[0])
    assert verdict["correct"], verdict["found"]
