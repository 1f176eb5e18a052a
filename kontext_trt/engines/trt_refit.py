"""LoRA swaps on a TensorRT transformer engine (or one of its step-cache parts) built with --refit: a TrtStage's
weights as stages.SetsWeights.

Names and layouts come from the export's weight map (export/weight_map.py), base values from the exported ONNX file
(the one the engine was built from: in --onnx DIR when given, else where the build found it); engines/refit.py does
the refit. Only weights the engine can refit are offered (Refitter.get_all_weights). The LoRA set is kept (as its
recipe, not its values) and set again whenever the engine is loaded afresh, so a reload never drops it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import read_export_manifest
from kontext_trt.core.weight_map import OnnxWeights
from kontext_trt.engines import cache, refit, trt_api
from kontext_trt.engines.trt_stages import TrtStage

log = logging.getLogger(__name__)

def source_onnx(stage: TrtStage, entry: dict) -> Path:
    """The ONNX file the stage's engine was built from: the same file (by sha256) in the stage's --onnx export folder
    when one is given, else the path the build recorded; one line when neither is there."""
    if stage.onnx_dir is not None:
        manifest = read_export_manifest(stage.onnx_dir)
        export = manifest.stages.get(stage.name) if manifest else None
        if export is None or export.get("sha256") != entry.get("onnx_sha256"):
            raise KontextError(f"{stage.onnx_dir} holds no {stage.name} export the engine {stage.plan} was built from "
                               f"(sha256 {str(entry.get('onnx_sha256'))[:12]}): LoRA swaps read its weight map and "
                               "exported values; pass the export folder the engines were built from with --onnx")
        return Path(stage.onnx_dir) / export["file"]
    path = Path(entry["onnx_file"])
    if not path.is_file():
        raise KontextError(f"{path}: the ONNX the engine {stage.plan} was built from is not there, and LoRA swaps read "
                           "its weight map and exported values: pass its export folder with --onnx DIR")
    return path


class RefitWeights:
    """A refittable engine's weights by diffusers name: set_weights refits the engine in place."""

    def __init__(self, stage: TrtStage) -> None:
        manifest = cache.read_engine_manifest(stage.plan.parent)
        entry = manifest.stages.get(stage.name, {}) if manifest else {}
        if not entry.get("flags", {}).get("refit"):
            raise KontextError(f"{stage.plan} was built without --refit, so its weights cannot be swapped: rebuild "
                               f"with `kontext-trt build ... --refit` (or pass --lora to export)")
        if stage.pool.low_vram:
            raise KontextError("LoRA swaps refit the resident transformer engines: drop --low-vram")
        onnx_path = source_onnx(stage, entry)
        refit.refittable_names(onnx_path)  # refuses quantized and unmapped exports in one line
        self.stage, self.onnx = stage, OnnxWeights(onnx_path, (refit.export_entry(onnx_path) or {}).get("weights"))
        self.changed: set[str] = set()  # initializers that hold LoRA values now
        self.applied: Iterable[tuple[str, torch.Tensor]] | None = None  # the set now on the engine, to set again
        self.refittable: set[str] | None = None  # initializers the engine can refit

    def engine(self) -> Any:
        """The stage's engine, loaded (and made resident) if it is not."""
        if self.stage.engine is None:  # loaded afresh below: base weights, nothing to set again
            self.applied, self.changed = None, set()
        self.stage.pool.admit(self.stage)
        return self.stage.engine

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The mapped weights the engine can refit, in torch layout."""
        if self.refittable is None:
            api = self.stage.pool.api
            refitter = api.trt.Refitter(self.engine(), trt_api._logger(api))
            self.refittable = set(refitter.get_all_weights())
        return {name: shape for name, shape in self.onnx.shapes().items() if self.onnx.map[name]["name"] in
                self.refittable}

    def base_weight(self, name: str) -> torch.Tensor:
        """A weight as exported, read from the ONNX file."""
        return self.onnx.read(name)

    def set_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refit the engine with these weights, and with the exported values for those a previous set changed. A set
        with `names` (lora.FusedWeights) streams and is kept as its recipe; another iterable is kept as given."""
        self.engine()
        self.apply(weights if hasattr(weights, "names") else list(weights))

    def apply(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refit the loaded engine (see set_weights)."""
        names = weights.names if hasattr(weights, "names") else [name for name, _ in weights]
        inits = {self.onnx.map[name]["name"] for name in names}
        by_init = {entry["name"]: name for name, entry in self.onnx.map.items()}
        resets = sorted(self.changed - inits)

        def values() -> Iterable[tuple[str, torch.Tensor]]:
            for name, value in weights:
                yield self.onnx.onnx_value(name, value)
            for init in resets:
                yield self.onnx.onnx_value(by_init[init], self.onnx.read(by_init[init]))

        self.applied = weights if names else None
        if not inits and not resets:
            return
        pool = self.stage.pool
        count, seconds = refit.refit(pool.api, self.stage.engine, values(), inits | set(resets),
                                     self.onnx.read_initializer, pool.stream, pool.device)
        self.changed = inits
        log.info("LoRA swap: refit %d %s weights in %.3fs", count, self.stage.name, seconds)

    def engine_reloaded(self) -> None:
        """The stage loaded its plan afresh, with the exported weights: set the LoRA set on it again."""
        self.changed = set()
        if self.applied is not None:
            self.apply(self.applied)


def weight_target(stage: TrtStage) -> RefitWeights:
    """The RefitWeights of a transformer engine stage (made once; the stage calls it back when it reloads)."""
    if stage.weights_target is None:
        stage.weights_target = RefitWeights(stage)
    return stage.weights_target
