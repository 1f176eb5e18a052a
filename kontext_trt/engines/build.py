"""Engine builds: one plan from one ONNX file (build_engine), and a resumable, atomic build of an engine set."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from kontext_trt.core import files
from kontext_trt.core.errors import KontextError
from kontext_trt.core.export_manifest import ExportManifest
from kontext_trt.core.family import FLUX1_KONTEXT, Family
from kontext_trt.core.onnx_dir import OnnxStage, read_onnx_dir
from kontext_trt.core.stages import TRANSFORMER_PARTS
from kontext_trt.core.timing import note, progress
from kontext_trt.engines import cache, profiles, refit, trt_api
from kontext_trt.engines.skus import PRECISION_FALLBACK, Sku, precision_refusal


@dataclass(frozen=True)
class Target:
    """What the engine runs on: a flavour, its compute capabilities, and the GPU present (TensorRT builds for it)."""

    flavor: str
    sms: tuple[int, ...]
    device_sm: int | None = None


# --refit: the stages LoRAs change, the transformer and its step-cache parts (engines/refit.py); --weight-streaming:
# profiles.STREAMED_STAGES
REFIT_STAGES = ("transformer", *TRANSFORMER_PARTS)


@dataclass(frozen=True)
class BuildFlags:
    """Builder options beyond shapes and targets (precision is not one: it comes from the ONNX)."""

    opt_level: int | None = None
    refit: bool = False
    weight_streaming: bool = False
    timing_cache: Path | None = None


@dataclass(frozen=True)
class BuildRequest:
    """Everything `kontext-trt build` decides before building."""

    onnx_dir: Path
    out: Path
    sku: Sku
    target: Target
    precision: str | None = None  # None: the transformer ONNX's
    shapes: profiles.Shapes = profiles.Shapes()
    stages: tuple[str, ...] = ()  # empty: every stage in the ONNX folder
    flags: BuildFlags = BuildFlags()
    gpu: bool = False  # a GPU is present: check validity and device memory after each build


def build_engine(onnx_path: Path, profile: profiles.Profile, target: Target,
                 flags: BuildFlags = BuildFlags()) -> memoryview:
    """Build one strongly typed plan (precision from the ONNX) for one optimization profile; returns its bytes."""
    api = trt_api.load_api(target.flavor)
    net = trt_api.parse_onnx(api, Path(onnx_path))
    trt_api.decompose_attention(api, net.network)
    config = net.builder.create_builder_config()
    trt_api.runtime_flags(api, config, flags.weight_streaming)
    monitor = trt_api.progress_monitor(api)  # referenced here until the build returns
    config.progress_monitor = monitor
    trt_api.set_targets(api, config, target.sms, target.device_sm)
    opt_profile = net.builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    if flags.opt_level is not None:
        config.builder_optimization_level = flags.opt_level
    if flags.refit:
        refit.mark_refittable(api, net.network, config, Path(onnx_path))
    if flags.weight_streaming:
        config.set_flag(api.trt.BuilderFlag.WEIGHT_STREAMING)
    with trt_api.timing_cache(api, config, flags.timing_cache):
        return trt_api.build_serialized(api, net, config, str(onnx_path))


def check_precision(stage: OnnxStage, sms: tuple[int, ...]) -> None:
    """Refuse, in one line, a stage whose precision one of the targets lacks."""
    for sm in sms:
        reason = precision_refusal(stage.precision, sm)
        if reason:
            raise KontextError(f"{stage.stage} ONNX {stage.path} is {stage.precision}: {reason}: build "
                               f"{PRECISION_FALLBACK.get(stage.precision, 'another precision')} for this GPU or "
                               f"drop sm{sm} from --target")


def stage_key(stage: OnnxStage, profile: profiles.Profile, target: Target, flags: BuildFlags, version: str,
              family: str = FLUX1_KONTEXT.name) -> str:
    """The identity of a plan (the model family's included): same key, same plan (the build is skipped)."""
    ident = {"family": family, "onnx": stage.sha256, "precision": stage.precision, "profile": profile,
             "flavor": target.flavor,
             "version": version, "targets": sorted(target.sms), "opt_level": flags.opt_level, "refit": flags.refit,
             "weight_streaming": flags.weight_streaming}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _build_args(req: BuildRequest, precision: str, stages: tuple[str, ...]) -> dict:
    """The build's arguments as the manifest keeps them (and cache.build_command prints them)."""
    static = profiles.format_sizes(req.shapes.sizes) if req.shapes.static else None
    lo, hi = req.shapes.batch
    return {"onnx": str(Path(req.onnx_dir).resolve()), "out": str(Path(req.out).resolve()),
            "backend": req.target.flavor, "sku": req.sku.name, "targets": [f"sm{sm}" for sm in req.target.sms],
            "precision": precision, "sizes": profiles.format_sizes(req.shapes.sizes), "static": static,
            "batch": f"{lo}-{hi}" if hi > lo else str(lo),
            "stages": list(stages), **{k: v for k, v in asdict(req.flags).items() if k != "timing_cache"}}


def build_set(req: BuildRequest) -> tuple[Path, list[str]]:
    """Build every missing or outdated plan of an engine set, one atomic file at a time: (its folder, stages built)."""
    api = trt_api.load_api(req.target.flavor)
    trt_api.check_targets(api, req.target.sms, req.target.device_sm)
    onnx = read_onnx_dir(req.onnx_dir)
    family = onnx.manifest.family if onnx.manifest else FLUX1_KONTEXT  # BFL's ONNX (no manifest) is FLUX.1
    stages = req.stages or tuple(s for s in (*family.stage_names, *family.parts) if s in onnx.stages)
    check_stages(stages, family, req.onnx_dir)
    picks = {s: onnx.pick(s, req.precision) for s in stages}
    for stage in picks.values():
        check_precision(stage, req.target.sms)
    precision = req.precision or (picks.get("transformer") or next(iter(picks.values()))).precision
    folder = cache.engine_folder(req.out, req.sku, api.folder, precision)
    folder.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temps(folder)
    flags = req.flags
    if api.is_rtx and flags.timing_cache is not None:
        note(f"note: {api.flavor} has no build timing cache (it would force a GPU query and change nothing); its "
             f"JIT kernels go to {folder / cache.RUNTIME_CACHE} on first run")
    if not api.is_rtx:
        flags = BuildFlags(flags.opt_level, flags.refit, flags.weight_streaming,
                           flags.timing_cache or folder.parent / cache.TIMING_CACHE)
    build = _build_args(req, precision, stages)
    old = cache.read_engine_manifest(folder)
    manifest = cache.EngineManifest(
        sku=req.sku.name, tag=req.sku.tag, flavor=api.flavor, version=api.version, precision=precision,
        family=family.name,
        targets=build["targets"], build=build, command=cache.build_command(build),
        checkpoint_fingerprint=onnx.fingerprint,
        onnx=json.loads(json.dumps({"dir": build["onnx"], "manifest_sha256": onnx.manifest_sha256,
                                    "kontext": onnx.manifest and onnx.manifest.kontext,
                                    **({"graphs": onnx.describe()} if onnx.manifest is None else {})})),
        tokens=json.loads(json.dumps(profiles.token_ranges(req.shapes, family))),  # as JSON keeps them
        caches={"runtime": cache.RUNTIME_CACHE if api.is_rtx else None,
                "timing": None if api.is_rtx else str(flags.timing_cache)},
        stages=dict(old.stages) if old else {})
    axes, built = profiles.axis_ranges(req.shapes, text_length(onnx.manifest), family), []
    for stage, pick in picks.items():
        profile = profiles.stage_profile(stage, pick.shapes, axes, family)
        stage_flags = flags if stage in profiles.STREAMED_STAGES else replace(flags, weight_streaming=False)
        stage_flags = stage_flags if stage in REFIT_STAGES else replace(stage_flags, refit=False)
        key = stage_key(pick, profile, req.target, stage_flags, api.version, family.name)
        entry, plan_path = manifest.stages.get(stage, {}), folder / f"{stage}.plan"
        if entry.get("key") == key and cache.plan_problem(plan_path, entry) is None:
            note(f"{stage}: up to date ({plan_path}, sha256 checked)")
            continue
        if entry.get("key") == key:
            note(f"{stage}: rebuilding: {cache.plan_problem(plan_path, entry)}")
        start = time.perf_counter()
        with progress(f"building {stage} ({pick.precision}, {api.folder}, {','.join(build['targets'])})"):
            try:
                plan = build_engine(pick.path, profile, req.target, stage_flags)
            except KontextError as exc:
                if flags.refit and api.is_rtx and not req.gpu:  # seen with TensorRT-RTX 1.7.1: refit builds need CUDA
                    raise KontextError(f"{exc}; {api.folder} could not build a refittable engine without a GPU: "
                                       "build on an RTX GPU or drop --refit") from None
                raise
            seconds = time.perf_counter() - start
            inspected = trt_api.inspect_plan(api, plan, req.gpu)
            _check_header(inspected["header"], api.version, build["targets"], stage)
            files.write_atomic(plan_path, plan)
        manifest.stages[stage] = _stage_entry(pick, plan_path, key, profile, axes, stage_flags, seconds, plan,
                                              inspected, family)
        built.append(stage)
        _record(folder, manifest, {s: manifest.stages[s] for s in built})
    _record(folder, manifest, {s: manifest.stages[s] for s in built})
    return folder, built


def check_stages(stages: tuple[str, ...], family: Family, onnx_dir: Path) -> None:
    """Refuse, in one line, a --stages name the export's family does not have."""
    for stage in stages:
        if stage not in (*family.stage_names, *family.parts):
            raise KontextError(f"--stages {stage}: {onnx_dir} is a {family.label} export, whose stages are "
                               f"{','.join((*family.stage_names, *family.parts))}: build those", "stages",
                               "invalid_value")


def text_length(manifest: ExportManifest | None) -> int | None:
    """The T5 text length the export manifest's KontextConfig records (a manifest from before it did: the dataclass
    default, 512); None without a manifest (the ONNX's own static size rules)."""
    from kontext_trt.runtime.flow import KontextConfig

    return None if manifest is None else int(manifest.kontext.get("text_length", KontextConfig.text_length))


def _record(folder: Path, manifest: cache.EngineManifest, built: dict[str, dict]) -> None:
    """Write this build's manifest under the folder lock, keeping stages a concurrent build recorded meanwhile (its
    stages, not this build's, win for stages this build did not make); unchanged manifests are not rewritten."""
    with files.folder_lock(folder):
        disk = cache.read_engine_manifest(folder)
        stages = {**manifest.stages, **(disk.stages if disk else {}), **built}
        build = {**manifest.build, "stages": list(dict.fromkeys([*manifest.build["stages"], *stages]))}
        merged = replace(manifest, build=build, command=cache.build_command(build), stages=stages)
        if merged != disk:
            cache.write_manifest(folder, merged)


def _stage_entry(pick: OnnxStage, plan_path: Path, key: str, profile: profiles.Profile, axes: dict,
                 flags: BuildFlags, seconds: float, plan: memoryview, inspected: dict,
                 family: Family = FLUX1_KONTEXT) -> dict:
    """One stage's manifest entry: its source, shapes, flags, build time, size and what the build host could check."""
    rules = profiles.FAMILY_AXES[family.name].stage_axes[pick.stage]
    used = {a for rule in rules.values() for a in rule if isinstance(a, str)}
    return {
        "file": plan_path.name, "key": key, "sha256": hashlib.sha256(plan).hexdigest(), "onnx_file": str(pick.path),
        "onnx_sha256": pick.sha256,
        "precision": pick.precision,
        "inputs": {n: {"shape": list(pick.shapes[n]), "dtype": pick.dtypes[n]} for n in pick.shapes},
        "profile": {n: dict(zip(("min", "opt", "max"), map(list, s))) for n, s in profile.items()},
        "axes": {a: list(axes[a]) for a in sorted(used) if a in axes},
        "flags": {"strongly_typed": True, "tf32": False, "opt_level": flags.opt_level, "refit": flags.refit,
                  "weight_streaming": flags.weight_streaming},
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 3), "engine_bytes": len(plan),
        "build_host_check": inspected["validity"], "header": inspected["header"],
        "device_memory_bytes": inspected["device_memory_bytes"], "device_memory_note": inspected["device_memory_note"],
    }


def _check_header(header: dict | None, version: str, targets: list[str], stage: str) -> None:
    """Refuse a TensorRT-RTX plan whose header names another version or other targets than asked for."""
    if header and (header["version"] != version or sorted(header["targets"]) != sorted(targets)):
        raise KontextError(f"{stage}: the plan header says {header['version']} for {header['targets']}, but the build "
                           f"asked {version} for {targets}: report this with your TensorRT-RTX version")
