"""The training script end to end at a few steps (CI never trains for real): it writes weights, configs, log and
loss curve, and synth ships what it wrote in the HF layout."""
import json

import pytest
import torch

from kontext_trt.core import checkpoint as ck
from kontext_trt.core.errors import KontextError
from kontext_trt.synth import checkpoint as synth
from kontext_trt.synth.trained import TrainedPreset, load_trained
from kontext_trt.train.flow import FlowRecipe
from kontext_trt.train.shapes import train_shapes
from kontext_trt.train.vae import VaeRecipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    return train_shapes(out, seed=5, vae_recipe=VaeRecipe(steps=4, batch=4, stats_scenes=16), flow_recipe=FlowRecipe(
        edits=16, steps=4, batch=4))


def test_training_writes_weights_config_log_and_curve(trained):
    for name in ("shapes.safetensors", "shapes.json", "train.log", "loss.png"):
        assert (trained / name).stat().st_size > 0
    info = json.loads((trained / "shapes.json").read_text())
    assert info["text_length"] == 32 and info["seed"] == 5
    assert info["sizes"]["vae"]["scaling_factor"] > 0 and "shift_factor" in info["sizes"]["vae"]
    log = (trained / "train.log").read_text()
    assert "vae step 4/4: mse" in log and "transformer step 4/4: loss" in log and "wrote" in log
    assert (trained / "shapes.safetensors").stat().st_size < 10 * 2**20  # the 10 MB bound
    assert not list(trained.glob("init*"))  # the random starting checkpoint is cleaned up


def test_synth_writes_trained_weights_in_the_hf_layout(trained, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr("kontext_trt.synth.trained.DATA", trained.parent, raising=True)
    (trained.parent / "shapes").mkdir(exist_ok=True)
    for name in ("shapes.safetensors", "shapes.json"):
        (trained.parent / "shapes" / name).write_bytes((trained / name).read_bytes())
    out = synth.write_synthetic_checkpoint(tmp_path / "ckpt", preset="shapes")
    shipped = load_file(trained / "shapes.safetensors")
    ckpt = ck.open_checkpoint(out)
    vae = ck.load_vae(ckpt, torch.float32).state_dict()
    assert torch.equal(vae["decoder.conv_out.weight"], shipped["vae/decoder.conv_out.weight"].float())
    transformer = ck.load_transformer(ckpt, torch.float32).state_dict()
    assert torch.equal(transformer["proj_out.weight"], shipped["transformer/proj_out.weight"].float())
    info = json.loads((trained / "shapes.json").read_text())
    assert ckpt.vae_config["scaling_factor"] == info["sizes"]["vae"]["scaling_factor"]


def test_changed_tokenizers_refuse_the_trained_weights(tmp_path, monkeypatch):
    real = load_trained("shapes")
    monkeypatch.setattr(synth, "load_trained", lambda name: TrainedPreset(real.sizes, real.text_length, "0" * 64,
                                                                          real.weights))
    with pytest.raises(KontextError, match="tokenizers no longer give the token ids"):
        synth.write_synthetic_checkpoint(tmp_path / "ckpt", preset="shapes")
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps 0: use 1 or more"),
    (["--lr", "-1"], "--lr -1.0: use a positive learning rate"),
    (["--lr", "nan"], "--lr nan: use a positive learning rate"),
    (["--edit-weight", "0.5"], "--edit-weight 0.5: use a finite weight of 1 or more"),
    (["--edit-weight", "nan"], "--edit-weight nan: use a finite weight of 1 or more"),
    (["--ema", "1"], "--ema 1.0: use a decay in [0, 1)"),
    (["--resume", "."], "no shapes.json and shapes.safetensors there"),
])
def test_bad_training_flags_fail_in_one_line_before_writing(flags, message, tmp_path, capsys):
    from kontext_trt.cli.main import main

    assert main(["train", "shapes", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_edit_weight_counts_the_changed_tokens_only():
    import torch

    from kontext_trt.train.flow import CHANGED_TOKEN_MSE, token_weights

    context = torch.zeros(2, 4, 64)
    target = context.clone()
    target[0, 1] += 1.0  # changed: mean square 1
    target[1, 2] += (CHANGED_TOKEN_MSE / 2) ** 0.5  # under the threshold: unchanged
    assert token_weights(target, context, 4.0).tolist() == [[1, 4, 1, 1], [1, 1, 1, 1]]
    assert token_weights(target, context, 1.0).tolist() == [[1, 1, 1, 1]] * 2  # weight 1: the plain mean


def test_moving_average_ends_with_the_average_of_the_steps_weights():
    from kontext_trt.train.optim import MovingAverage

    weight = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    average = MovingAverage([weight], 0.5)
    for value in ([2.0, 0.0], [4.0, 8.0]):
        weight.data = torch.tensor(value)
        average.update()
    average.copy_to_params()
    assert weight.tolist() == [2.5, 5.0]  # 0.5 * (0.5 * start + 0.5 * step 1) + 0.5 * step 2
    unchanged = torch.nn.Parameter(torch.tensor([1.0]))
    off = MovingAverage([unchanged], 0.0)
    unchanged.data = torch.tensor([3.0])
    off.update()
    off.copy_to_params()
    assert unchanged.tolist() == [3.0]  # decay 0: the last step's weights
