"""Stand-in tiny ONNX stages with the contract's I/O names and dynamic axes, until export/ provides `tiny_onnx`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DT, DC, HID = 64, 32, 32  # T5 width, CLIP width, transformer width


class Clip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(1000, DC), nn.Linear(DC, DC)

    def forward(self, input_ids):
        h = torch.tanh(self.proj(self.emb(input_ids)))
        return h, h[:, -1]


class T5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(1000, DT), nn.Linear(DT, DT)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


class VaeEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, images):
        return self.conv(images)


class VaeDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.conv = nn.Upsample(scale_factor=8.0), nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, latent):
        return torch.tanh(self.conv(self.up(latent)))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x, self.txt, self.vec = nn.Linear(64, HID), nn.Linear(DT, HID), nn.Linear(DC + 2, HID)
        self.ids, self.out = nn.Linear(3, HID), nn.Linear(HID, 64)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        vec = self.vec(torch.cat([pooled_projections, timestep[:, None], guidance[:, None]], -1))[:, None]
        x = self.x(hidden_states) + self.ids(img_ids)[None] + vec
        t = self.txt(encoder_hidden_states) + self.ids(txt_ids)[None]
        attn = torch.softmax(x @ t.transpose(1, 2) / HID ** 0.5, -1)
        return self.out(x + attn @ t)


def export(out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the five stages as ONNX (with a manifest like export/'s) under out and return out."""
    torch.manual_seed(0)
    f = dict(dtype=dtype)
    b, n = 1, 40
    stages = {
        "clip": (Clip(), (torch.zeros(b, 77, dtype=torch.long),), {"input_ids": {0: "B"}},
                 {"text_embeddings": {0: "B"}, "pooled_embeddings": {0: "B"}}),
        "t5": (T5(), (torch.zeros(b, 512, dtype=torch.long),), {"input_ids": {0: "B"}}, {"text_embeddings": {0: "B"}}),
        "vae_encoder": (VaeEncoder(), (torch.zeros(b, 3, 64, 48, **f),), {"images": {0: "B", 2: "H", 3: "W"}},
                        {"latent": {0: "B", 2: "h", 3: "w"}}),
        "vae_decoder": (VaeDecoder(), (torch.zeros(b, 16, 8, 6, **f),), {"latent": {0: "B", 2: "h", 3: "w"}},
                        {"images": {0: "B", 2: "H", 3: "W"}}),
        "transformer": (Transformer(), (torch.zeros(b, n, 64, **f), torch.zeros(b, 512, DT, **f),
                                        torch.zeros(b, DC, **f), torch.zeros(b, **f), torch.zeros(n, 3, **f),
                                        torch.zeros(512, 3, **f), torch.zeros(b, **f)),
                        {"hidden_states": {0: "B", 1: "L"}, "encoder_hidden_states": {0: "B"},
                         "pooled_projections": {0: "B"}, "timestep": {0: "B"}, "img_ids": {0: "L"},
                         "guidance": {0: "B"}},
                        {"latent": {0: "B", 1: "L"}}),
    }
    from kontext_trt.core.stages import STAGE_IO

    manifest = {"format_version": 1, "stages": {}, "checkpoint": {"path": "proto", "fingerprint": "proto-tiny"},
                "kontext": {}, "tokenizers": {"clip": "tokenizer", "t5": "tokenizer_2"}}
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    for name, (module, args, in_axes, out_axes) in stages.items():
        path = out / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        inputs, outputs = STAGE_IO[name]
        torch.onnx.export(module.to(dtype).eval(), args, str(path), input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes={**in_axes, **out_axes}, opset_version=17,
                          dynamo=False)
        manifest["stages"][name] = {"file": f"{name}/model.onnx", "precision": precision, "opset": 17}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
