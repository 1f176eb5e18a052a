"""`kontext-trt train shapes`: train the shapes Kontext on this CPU and write its weights, configs, log and loss curve.

Order: a random checkpoint of the synth "shapes" sizes (tokenizers built offline, frozen random text encoders), the
VAE on scenes, its latent shift/scale measured, the training edits encoded once, then the transformer. Output in
DIR: shapes.safetensors (fp16, every component's tensors under "<component>/"), shapes.json (the sizes, VAE
normalisation, text length, recipes, figures), train.log and loss.png.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from kontext_trt.core import checkpoint as ck
from kontext_trt.core.files import temp_dir, write_atomic, write_json
from kontext_trt.core.text import CLIP_LEN, tokenize
from kontext_trt.runtime.schedule import ShiftConfig
from kontext_trt.runtime.torch_stages import TransformerModule
from kontext_trt.shapes.scenes import all_prompts
from kontext_trt.synth.checkpoint import PRESETS, write_synthetic_checkpoint
from kontext_trt.synth.trained import load_trained, prompt_ids_digest
from kontext_trt.train.flow import FlowRecipe, encode_edits, train_transformer, training_edits
from kontext_trt.train.vae import VaeRecipe, latent_stats, train_vae

log = logging.getLogger(__name__)
TEXT_LENGTH = 32  # T5 tokens: the task's prompts are at most a dozen
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def encode_prompt_table(clip, t5, clip_tokenizer, t5_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 states (P, L, Dt), CLIP pooled (P, Dc)) in float32 for every task prompt, as runtime's encode_prompts."""
    prompts = all_prompts()
    text = t5(input_ids=tokenize(t5_tokenizer, prompts, TEXT_LENGTH, "T5")).last_hidden_state
    pooled = clip(input_ids=tokenize(clip_tokenizer, prompts, CLIP_LEN, "CLIP")).pooler_output
    return text.float(), pooled.float()


def train_shapes(out: Path, seed: int = 0, vae_recipe: VaeRecipe = VaeRecipe(),
                 flow_recipe: FlowRecipe = FlowRecipe(), resume: Path | None = None) -> Path:
    """Train the shapes model and write it to `out` (see the module docstring); returns out. `resume`: a folder an
    earlier run wrote: start from its weights and VAE normalisation, skip the VAE, train the transformer further."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    start = time.monotonic()

    def note_line(text: str) -> None:
        line = f"[{time.monotonic() - start:7.1f}s] {text}"
        lines.append(line)
        log.info(line)
        (out / "train.log").write_text("\n".join(lines) + "\n", encoding="utf-8")

    torch.manual_seed(seed)
    init = temp_dir(out / "init")
    write_synthetic_checkpoint(init, preset="shapes", seed=seed, force=True, text_length=TEXT_LENGTH,
                               untrained=True)
    ckpt = ck.open_checkpoint(init)
    clip_tok, t5_tok = ck.load_tokenizers(ckpt)
    clip, t5 = ck.load_clip(ckpt, torch.float32).eval(), ck.load_t5(ckpt, torch.float32).eval()
    vae = ck.load_vae(ckpt, torch.float32).requires_grad_(True)
    model = TransformerModule(ck.load_transformer(ckpt, torch.float32)).requires_grad_(True)
    millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model, vae)]
    note_line(f"init: seed {seed}, torch {torch.__version__}, {torch.get_num_threads()} threads; transformer "
              f"{millions[0]:.2f}M, vae {millions[1]:.2f}M parameters")
    vae_losses: list[float] = []
    if resume is None:
        train_vae(vae, vae_recipe, seed, vae_losses, note_line)
        shift, scale, vae_psnr = latent_stats(vae, seed + 1, vae_recipe.stats_scenes)
    else:
        shift, scale, vae_psnr = load_run(Path(resume), model, vae, clip, t5)
        note_line(f"resumed from {resume}: its weights, the VAE untouched")
    note_line(f"vae: shift_factor {shift:.4f}, scaling_factor {scale:.4f}, reconstruction PSNR {vae_psnr:.2f} dB")

    def encode(x: torch.Tensor) -> torch.Tensor:
        return (vae.encode(x).latent_dist.mean - shift) * scale

    edits = training_edits(flow_recipe.edits, seed + 2)
    data = encode_edits(edits, all_prompts(), encode)
    note_line(f"encoded {len(edits)} training edits")
    clip.requires_grad_(flow_recipe.train_text)
    t5.requires_grad_(flow_recipe.train_text)
    flow_losses: list[float] = []
    train_transformer(model, data, lambda: encode_prompt_table(clip, t5, clip_tok, t5_tok),
                      [*clip.parameters(), *t5.parameters()], flow_recipe, ShiftConfig(), seed + 3, flow_losses,
                      note_line)
    tensors = {f"transformer/{k}": v for k, v in model.model.state_dict().items()}
    tensors |= {f"vae/{k}": v for k, v in vae.state_dict().items()}
    tensors |= {f"text_encoder/{k}": v for k, v in _clip_state(clip).items()}
    tensors |= {f"text_encoder_2/{k}": v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    write_atomic(out / "shapes.safetensors", lambda tmp: save_file(half, tmp, metadata={"format": "pt"}))
    sizes = {**PRESETS["shapes"], "vae": {**PRESETS["shapes"]["vae"], "shift_factor": round(shift, 6),
                                          "scaling_factor": round(scale, 6)}}
    info = {"sizes": sizes, "text_length": TEXT_LENGTH, "seed": seed,
            "prompt_ids_sha256": prompt_ids_digest(clip_tok, t5_tok, TEXT_LENGTH),
            "resumed_from": None if resume is None else str(resume),
            "vae_recipe": None if resume is not None else asdict(vae_recipe), "flow_recipe": asdict(flow_recipe),
            "vae_psnr_db": round(vae_psnr, 2), "train_seconds": round(time.monotonic() - start, 1),
            "final_losses": {"vae_mse": float(np.mean(vae_losses[-100:])) if vae_losses else None,
                             "flow": float(np.mean(flow_losses[-100:]))}}
    write_json(out / "shapes.json", info, indent=2)
    _plot(out / "loss.png", vae_losses, flow_losses)
    note_line(f"wrote {out / 'shapes.safetensors'} ({(out / 'shapes.safetensors').stat().st_size / 2**20:.2f} MiB)")
    shutil.rmtree(init, ignore_errors=True)
    return out


def load_run(folder: Path, model, vae, clip, t5) -> tuple[float, float, float]:
    """Load an earlier run's weights into the four models; its (shift, scale, VAE PSNR)."""
    run = load_trained("shapes", folder)
    for component, module in (("transformer", model.model), ("vae", vae), ("text_encoder", clip),
                              ("text_encoder_2", t5)):
        part = {k: v.float() for k, v in run.weights[component].items()}
        if module is clip and not any(k.startswith("text_model.") for k in clip.state_dict()):
            part = {k.removeprefix("text_model."): v for k, v in part.items()}  # the file keeps the old prefix
        missing, unexpected = module.load_state_dict(part, strict=False)
        if unexpected or [m for m in missing if m != "encoder.embed_tokens.weight"]:
            raise ValueError(f"{folder}: {component} does not match the shapes sizes ({missing[:3]}, {unexpected[:3]})")
    if hasattr(t5, "tie_weights"):
        t5.tie_weights()
    return run.sizes["vae"]["shift_factor"], run.sizes["vae"]["scaling_factor"], run.vae_psnr_db


def _clip_state(clip) -> dict[str, torch.Tensor]:
    """CLIP's tensors under the real file's `text_model.` names."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.state_dict().items()}


def _plot(path: Path, vae_losses: list[float], flow_losses: list[float]) -> None:
    """Both loss curves (log scale, 50-step running mean) side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, losses, title in ((axes[0], vae_losses, "VAE reconstruction MSE"),
                              (axes[1], flow_losses, "transformer flow loss")):
        smooth = np.convolve(losses, np.ones(50) / 50, mode="valid") if len(losses) >= 50 else losses
        ax.plot(smooth)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
