"""Each exported stage in ONNX Runtime (CPU, fp32) against its PyTorch module, at square, non-square and batch-2 shapes."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from kontext_trt.core import checkpoint as ck
from kontext_trt.core.stages import STAGE_IO
from kontext_trt.runtime.latents import latent_ids, text_ids
from kontext_trt.runtime.torch_stages import stage_modules

TOL = 1e-4  # max abs difference relative to the output's max abs value


@pytest.fixture(scope="module")
def modules(tiny_ckpt):
    return stage_modules(ck.open_checkpoint(tiny_ckpt), torch.float32)


@pytest.fixture(scope="module")
def sessions(tiny_onnx):
    return {name: ort.InferenceSession(str(tiny_onnx / name / "model.onnx"), providers=["CPUExecutionProvider"])
            for name in CASES}


def transformer_inputs(batch, target, context):
    """(w, h) target and optional context: packed tokens, ids [index, row, col] as the loop builds them."""
    ids = [latent_ids(h // 8, w // 8, index=i) for i, (w, h) in enumerate(s for s in (target, context) if s)]
    ids = torch.cat(ids)
    g = torch.Generator().manual_seed(batch * 1000 + len(ids))
    return {"hidden_states": torch.randn(batch, len(ids), 64, generator=g),
            "encoder_hidden_states": torch.randn(batch, 512, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g),
            "timestep": torch.rand(batch, generator=g), "img_ids": ids, "txt_ids": text_ids(512),
            "guidance": torch.full((batch,), 2.5)}


CASES = {
    "clip": [{"input_ids": torch.randint(0, 400, (b, 77), generator=torch.Generator().manual_seed(b))} for b in (1, 2, 3)],
    "t5": [{"input_ids": torch.randint(0, 400, (b, 512), generator=torch.Generator().manual_seed(b))} for b in (1, 2, 4)],
    "vae_encoder": [{"images": torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(w)) * 2 - 1}
                    for b, w, h in ((1, 64, 64), (1, 96, 64), (2, 64, 112))],
    "vae_decoder": [{"latent": torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(w))}
                    for b, w, h in ((1, 8, 8), (1, 12, 8), (2, 8, 14))],
    "transformer": [transformer_inputs(1, (64, 64), (64, 64)), transformer_inputs(1, (96, 64), (64, 80)),
                    transformer_inputs(2, (64, 64), (96, 64)), transformer_inputs(1, (64, 64), None)],
}


@pytest.mark.parametrize("stage,case", [(s, i) for s, cases in CASES.items() for i in range(len(cases))])
def test_onnx_matches_torch(modules, sessions, stage, case):
    inputs = CASES[stage][case]
    with torch.inference_mode():
        expected = modules[stage](*(inputs[n] for n in STAGE_IO[stage][0]))
    got = sessions[stage].run(list(STAGE_IO[stage][1]), {n: t.numpy() for n, t in inputs.items()})
    for name, ref, out in zip(STAGE_IO[stage][1], expected, got):
        assert out.shape == tuple(ref.shape), name
        scale = ref.abs().max().item()
        assert np.abs(out - ref.numpy()).max() <= TOL * scale, name
