"""The engine cache ENGINES/<sku>-sm<cc>/<flavor>-<version>/<precision>/{<stage>.plan, manifest.json} and its lookup.

A lookup that does not match the running GPU, library version, precision or requested size fails with one line: what
was asked, what is here, and the `kontext-trt build` command that makes what was asked.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from kontext_trt.core import files
from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import FLUX1_KONTEXT, Family, family_named
from kontext_trt.core.stages import STAGE_NAMES, TRANSFORMER_PARTS
from kontext_trt.core.timing import progress
from kontext_trt.engines import profiles
from kontext_trt.engines.skus import SKUS, Sku

MANIFEST = "manifest.json"
RUNTIME_CACHE = "runtime.cache"  # TensorRT-RTX JIT kernels, per engine folder, filled at run time
TIMING_CACHE = "timing.cache"  # TensorRT tactic timings, per <sku>/<flavor>-<version>, filled at build time


@dataclass
class EngineManifest:
    """An engine folder's manifest.json as a value: what was built (SKU, TensorRT flavour and version, precision,
    targets) for which model family, from what (`onnx`: the export folder, its manifest's sha256 and loop config; `checkpoint_fingerprint`),
    how (`build`: the build's arguments, `command`: the line that rebuilds it, `tokens`, `caches`) and, per stage, its
    plan entry (file, key, sha256, profile, axes, flags, sizes and what the build host checked)."""

    sku: str
    tag: str
    flavor: str
    version: str
    precision: str
    targets: list[str]
    build: dict
    command: str
    checkpoint_fingerprint: str | None = None
    family: str = FLUX1_KONTEXT.name  # core.family: the model family the engines run (older manifests: FLUX.1)
    onnx: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    caches: dict = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON object written to manifest.json."""
        return asdict(self)


@dataclass(frozen=True)
class Engines:
    """A matching engine set: its folder, manifest, plan file per stage and (TensorRT-RTX) runtime-cache path."""

    folder: Path
    manifest: EngineManifest
    plans: dict[str, Path]
    runtime_cache: Path | None


def engine_folder(root: Path, sku: Sku, flavor_version: str, precision: str) -> Path:
    """Where one engine set lives."""
    return Path(root) / sku.tag / flavor_version / precision


def open_set(folder: Path) -> Engines | None:
    """Every built stage of an engine folder as an Engines, or None without a manifest."""
    manifest = read_engine_manifest(folder)
    if manifest is None:
        return None
    plans = {stage: Path(folder) / entry["file"] for stage, entry in manifest.stages.items()}
    runtime = manifest.caches.get("runtime")
    return Engines(Path(folder), manifest, plans, Path(folder) / runtime if runtime else None)


def read_engine_manifest(folder: Path) -> EngineManifest | None:
    """The one reader of an engine folder's manifest.json: None if there is none, or if it is unreadable or
    malformed (the build then rebuilds the set)."""
    try:
        data = files.read_json(Path(folder) / MANIFEST)
    except KontextError:
        return None
    if data is None:
        return None
    names = {f.name for f in fields(EngineManifest)}
    try:
        manifest = EngineManifest(**{key: value for key, value in data.items() if key in names})
    except TypeError:  # a required field is missing
        return None
    return manifest if isinstance(manifest.stages, dict) and isinstance(manifest.build, dict) else None


def write_manifest(folder: Path, manifest: EngineManifest) -> None:
    """Write manifest.json atomically."""
    files.write_json(Path(folder) / MANIFEST, manifest.to_json(), sort_keys=True)


def plan_problem(plan: Path, entry: dict) -> str | None:
    """Why a plan file is not the one its manifest entry records (missing, other size, other sha256), or None."""
    if not plan.is_file():
        return f"{plan} is missing"
    if plan.stat().st_size != entry.get("engine_bytes"):
        return f"{plan} is not the size the manifest records"
    if files.sha256_file(plan) != entry.get("sha256"):
        return (f"{plan} does not have the sha256 the manifest records (changed or damaged since the build)"
                if entry.get("sha256") else f"{plan} was built before plans were hashed")
    return None


def build_command(build: dict) -> str:
    """The `kontext-trt build` line for a manifest's build arguments."""
    words = ["kontext-trt", "build", "--onnx", build["onnx"], "--out", build["out"], "--backend", build["backend"],
             "--sku", build["sku"], "--target", ",".join(build["targets"]), "--precision", build["precision"]]
    words += ["--static", build["static"]] if build.get("static") else ["--sizes", build["sizes"]]
    words += ["--batch", build["batch"]]
    if build.get("opt_level") is not None:
        words += ["--opt-level", str(build["opt_level"])]
    words += [flag for flag in ("--refit", "--weight-streaming") if build.get(flag[2:].replace("-", "_"))]
    if build.get("stages") and set(build["stages"]) != set(STAGE_NAMES):
        words += ["--stages", *build["stages"]]
    return shlex.join(words)


def _sets(root: Path) -> list[tuple[Path, EngineManifest]]:
    """Every engine set under root: (folder, manifest)."""
    found = ((p.parent, read_engine_manifest(p.parent)) for p in sorted(Path(root).glob(f"*/*/*/{MANIFEST}")))
    return [(folder, manifest) for folder, manifest in found if manifest]


def _absent(root: Path, folder: Path) -> tuple[str, str]:
    """(param, code) of a missing engine set: other precisions beside it -> precision; sets for another GPU, SKU or
    TensorRT version only -> gpu_mismatch; nothing built -> not_found."""
    if built_precisions(folder.parent):
        return "precision", "not_found"
    return ("engines", "gpu_mismatch") if _sets(root) else ("engines", "not_found")


def _summary(root: Path) -> str:
    """What engine sets are under root, on one line."""
    sets = []
    for folder, manifest in _sets(root):
        build = manifest.build
        sets.append(f"{folder.relative_to(root)} (sizes {build.get('static') or build.get('sizes', '?')}, batch "
                    f"{build.get('batch', '?')}, stages {','.join(manifest.stages) or 'none'})")
    if not sets:
        return "nothing"
    return "; ".join(sets[:4]) + (f"; and {len(sets) - 4} more" if len(sets) > 4 else "")


def _rebuild(root: Path, sku: Sku, flavor_version: str, precision: str, sizes: list[tuple[int, int]], batch: int,
             stages: list[str], near: EngineManifest | None) -> str:
    """The build command that makes the asked-for set, keeping what a near miss (same folder) already covers."""
    if near is None:
        onnx = next((m.build["onnx"] for _, m in _sets(root) if "onnx" in m.build), "ONNX_DIR")
        return build_command({"onnx": onnx, "out": str(root), "backend": flavor_version.rsplit("-", 1)[0],
                              "sku": sku.name, "targets": [f"sm{sku.sm}"], "precision": precision, "sizes": "all",
                              "batch": str(batch)})
    old = near.build
    lo, hi = profiles.parse_batch(old["batch"])
    lo, hi = min(lo, batch), max(hi, batch)
    keep = profiles.parse_sizes(old.get("static") or old["sizes"])
    return build_command({**old, "out": str(root), "static": None,
                          "sizes": profiles.format_sizes(tuple(dict.fromkeys([*keep, *sizes]))),
                          "batch": f"{lo}-{hi}" if hi > lo else str(lo),
                          "stages": [s for s in dict.fromkeys((*set_family(near).stage_names, *STAGE_NAMES,
                                                               *TRANSFORMER_PARTS))
                                     if s in {*old.get("stages", ()), *stages}]})


def reference_count_refusal(family: Family, count: int) -> list[str]:
    """[why] when a request has more reference images than the family's engines are built for, else []."""
    most = family.max_references
    return [f"{count} reference images, {family.label} engines take at most {most} (pass fewer --image)"] \
        if count > most else []


def built_precisions(base: Path) -> list[str]:
    """The precisions with an engine set (a manifest) under <sku>/<flavor>-<version>."""
    return sorted(p.parent.name for p in Path(base).glob(f"*/{MANIFEST}"))


def pick_precision(base: Path, precision: str | None) -> str:
    """The precision folder to use under <sku>/<flavor>-<version>: the one asked for, else the only one built (bf16
    when none is: the lookup then says what to build)."""
    if precision is not None:
        return precision
    built = built_precisions(base)
    if len(built) > 1:
        raise KontextError(f"{base} holds engine sets in {', '.join(built)}: pass --precision to pick one",
                           "precision", "missing_argument")
    return built[0] if built else "bf16"


def set_family(manifest: EngineManifest | None) -> Family:
    """The model family an engine set runs (core.family; FLUX.1 Kontext when there is no set)."""
    return family_named(manifest.family) if manifest else FLUX1_KONTEXT


def find_engines(engines_dir: Path, sku: Sku | str, flavor_version: str, precision: str, width: int, height: int,
                 batch: int = 1, context: tuple[int, int] | None = None,
                 stages: tuple[str, ...] = STAGE_NAMES, references: tuple[tuple[int, int], ...] = ()) -> Engines:
    """The engine set for this GPU SKU, library (<flavor>-<version>) and precision that covers a WxH output from a
    context image of size `context` (None: text-to-image) and the further `references` (FLUX.2 [klein]) at this
    batch, or one line saying why not and how to fix. Its plans are every stage the set has (the ones this request
    needs checked)."""
    sku = SKUS[sku] if isinstance(sku, str) else sku
    root = Path(engines_dir)
    folder = engine_folder(root, sku, flavor_version, precision)
    found = open_set(folder)
    manifest = found.manifest if found else None
    images = [context, *references] if context else []
    source = (f" from a {context[0]}x{context[1]} image" if len(images) == 1 else
              f" from {len(images)} images ({', '.join(f'{w}x{h}' for w, h in images)})" if images else
              " (text-to-image)")
    want = f"{sku.tag}/{flavor_version}/{precision} for {width}x{height}{source}, batch {batch}"
    needed = [s for s in stages if s != "vae_encoder" or context]
    sizes = [(width, height), *images]

    def fail(reason: str, near: EngineManifest | None = None, param: str = "engines", code: str = "not_found") -> KontextError:
        return KontextError(f"no engines for {want}: {reason}; built here: {_summary(root)}; rebuild: "
                            f"{_rebuild(root, sku, flavor_version, precision, sizes, batch, needed, near)}", param,
                            code)

    if manifest is None:
        raise fail(f"{folder} has no {MANIFEST}", None, *_absent(root, folder))
    missing = [s for s in needed if s not in manifest.stages]
    if missing:
        raise fail(f"stage {', '.join(missing)} not built in {folder}", manifest)
    family = set_family(manifest)
    outside = reference_count_refusal(family, len(images))
    param, batch_only = "image" if outside else "size", not outside
    for stage, axes in profiles.request_axes(width, height, context, batch, references, family):
        if stage not in needed:
            continue
        entry = manifest.stages[stage]
        for axis, value in axes.items():
            lo, _, hi = entry["axes"].get(axis, (value, value, value))
            if not lo <= value <= hi:
                outside.append(f"{stage} {axis}={value} outside {lo}..{hi}")
                batch_only = batch_only and axis == "B"
    if outside:  # the request's field at fault: n (the batch), size (output or input image) or image (how many)
        raise fail(", ".join(outside), manifest, "n" if batch_only else param, "out_of_range")
    with progress(f"hashing the {len(needed)} plans in {folder} (sha256, checked once against the manifest)"):
        for stage in needed:
            problem = plan_problem(found.plans[stage], manifest.stages[stage])
            if problem:
                raise fail(problem, manifest, "engines", "invalid_value")
    # every stage the set has, not only this request's: a text-to-image first request must not leave a later edit
    # (a session's next turn, the server) without its VAE encoder
    plans = {s: found.plans[s] for s in stages if s in found.plans and found.plans[s].is_file()}
    return Engines(folder, manifest, plans, found.runtime_cache)
