"""FLUX.1 Kontext [dev]'s constants that a checkpoint may not carry (BFL's single files have no configs): one table
that the checkpoint loader, the BFL converter, the schedule, the flow loop's config and the synthetic checkpoint read."""
from __future__ import annotations

HUB_ID = "black-forest-labs/FLUX.1-Kontext-dev"
REFETCH = f"re-download it (hf download {HUB_ID} --local-dir DIR) or regenerate it"
# scheduler/scheduler_config.json of the real snapshot; BFL's get_schedule uses the same numbers.
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.35.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# The autoencoder's latent normalisation (vae/config.json's scaling_factor and shift_factor; BFL's ae has none).
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
LATENT_CHANNELS = 16
TRANSFORMER_IN_CHANNELS = 64
