"""LoRA swaps on a TensorRT transformer engine built with --refit: a TrtStage's weights as stages.SetsWeights.

Names and layouts come from the export's weight map (export/weight_map.py), base values from the exported ONNX file;
engines/refit.py does the refit. Runs on a GPU only (never run here: no GPU on the build host).
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Iterable

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.weight_map import OnnxWeights
from kontext_trt.engines import cache, refit
from kontext_trt.engines.trt_stages import TrtStage

log = logging.getLogger(__name__)
_TARGETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one RefitWeights per TrtStage


class RefitWeights:
    """A refittable transformer engine's weights by diffusers name: set_weights refits the engine in place."""

    def __init__(self, stage: TrtStage) -> None:
        entry = (cache.read_engine_manifest(stage.plan.parent) or {}).get("stages", {}).get(stage.name, {})
        if not entry.get("flags", {}).get("refit"):
            raise KontextError(f"{stage.plan} was built without --refit, so its weights cannot be swapped: rebuild "
                               f"with `kontext-trt build ... --refit` (or pass --lora to export)")
        if stage.pool.low_vram:
            raise KontextError("LoRA swaps refit the resident transformer engine: drop --low-vram")
        onnx_path = Path(entry["onnx_file"])
        refit.refittable_names(onnx_path)  # refuses quantized and unmapped exports in one line
        self.stage, self.onnx = stage, OnnxWeights(onnx_path, (refit.export_entry(onnx_path) or {}).get("weights"))
        self.changed: set[str] = set()  # initializers that hold LoRA values now

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The mapped weights' shapes in torch layout."""
        return self.onnx.shapes()

    def base_weight(self, name: str) -> torch.Tensor:
        """A weight as exported, read from the ONNX file."""
        return self.onnx.read(name)

    def set_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refit the engine with these weights, and with the exported values for those a previous set changed."""
        values = dict(self.onnx.onnx_value(name, value) for name, value in weights)
        lora_inits = set(values)
        by_init = {entry["name"]: name for name, entry in self.onnx.map.items()}
        for init in self.changed - lora_inits:
            values.update([self.onnx.onnx_value(by_init[init], self.onnx.read(by_init[init]))])
        if not values:
            return
        if self.stage.engine is None:
            self.stage.load()
        seconds = refit.refit(self.stage.pool.api, self.stage.engine, values, self.stage.stream_handle())
        self.changed = lora_inits
        log.info("LoRA swap: refit %d transformer weights in %.3fs", len(values), seconds)


def weight_target(stage: TrtStage) -> RefitWeights:
    """The RefitWeights of a transformer engine stage (made once)."""
    if stage not in _TARGETS:
        _TARGETS[stage] = RefitWeights(stage)
    return _TARGETS[stage]
