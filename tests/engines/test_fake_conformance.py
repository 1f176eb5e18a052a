"""The TensorRT fakes and the code against the real bindings: every name a fake implements exists on the real binding
(TensorRT-RTX: the installed `tensorrt_rtx`; datacenter TensorRT: engines/trt_names.DATACENTER, read from NVIDIA's
bindings), every binding name engines/ reaches is listed in trt_names.USED (kept in sync by an AST scan) and exists in
each flavour whose code path reaches it, and the checks report a name taken out of the real-binding list."""
from __future__ import annotations

import ast
import enum
import functools
import inspect
from pathlib import Path
from typing import Callable

import pytest
import torch

from kontext_trt.engines import fake_trt, trt_names
from kontext_trt.engines.trt_names import DATACENTER, FLOOR, RTX, TRT, USED

ENGINES = Path(fake_trt.__file__).parent
NOT_CODE = {"fake_trt.py", "trt_names.py"}
# a receiver's name in engines/ -> the binding classes it holds
RECEIVERS = {"engine": ("ICudaEngine",), "exec_ctx": ("IExecutionContext",), "builder": ("Builder",),
             "network": ("INetworkDefinition",), "parser": ("OnnxParser",), "runtime": ("Runtime",),
             "refitter": ("Refitter",), "layer": ("ILayer", "IAttentionOutputLayer"), "attention": ("IAttention",),
             "config": ("IBuilderConfig", "IRuntimeConfig"), "cache": ("IRuntimeCache", "ITimingCache"),
             "opt_profile": ("IOptimizationProfile",)}
CALL_RECEIVERS = {"_runtime": ("Runtime",)}  # trt_api._runtime(api).deserialize_cuda_engine(...)


# --- what the code reaches ---------------------------------------------------------------------------------------

def chain(node: ast.AST) -> list[str]:
    """a.b.c -> ["a", "b", "c"]; a call receiver f(x).b -> ["()f", "b"]; anything else -> ["?", ...]."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
        parts.append("()" + (node.func.id if isinstance(node.func, ast.Name) else node.func.attr))
    else:
        parts.append("?")
    parts.reverse()
    dunder = next((i for i, p in enumerate(parts) if p.startswith("__")), len(parts))
    return parts[:dunder]


def reached(parts: list[str], modules: set[str]) -> set[tuple[tuple[str, ...], str]]:
    """(candidate keys) for one attribute chain: after `trt`, the module path; else each receiver.attr pair."""
    if "trt" in parts:
        rest = parts[parts.index("trt") + 1:]
        return {((".".join(rest),), "")} if rest else set()
    found = set()
    for recv, attr in zip(parts, parts[1:]):
        classes = CALL_RECEIVERS.get(recv[2:]) if recv.startswith("()") else (
            RECEIVERS.get(recv) if recv not in modules else None)
        if classes and not attr.startswith("_"):
            found.add((tuple(f"{c}.{attr}" for c in classes), f"{recv}.{attr}"))
    return found


def scan(path: Path) -> set[tuple[tuple[str, ...], str]]:
    """Every binding name one module reaches: attribute chains, getattr/hasattr with a literal name, and the methods
    of its subclasses of binding classes (overrides TensorRT calls); as (candidate keys, where)."""
    tree = ast.parse(path.read_text())
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            found |= reached(chain(node), modules)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and isinstance(node.args[1], ast.Constant)):
            found |= reached(chain(node.args[0]) + [node.args[1].value], modules)
        elif isinstance(node, ast.ClassDef):
            for base in map(chain, node.bases):
                if "trt" in base:
                    binding = ".".join(base[base.index("trt") + 1:])
                    found |= {((f"{binding}.{f.name}",), f"{node.name}.{f.name}") for f in node.body
                              if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
    return {(keys, f"{path.name}: {where}") for keys, where in found}


@functools.cache
def code_names() -> frozenset:
    return frozenset(item for path in sorted(ENGINES.glob("*.py")) if path.name not in NOT_CODE for item in scan(path))


def test_used_table_matches_the_code():
    """Every binding name engines/ reaches is in USED, and every USED name is still reached."""
    unlisted = sorted(where for keys, where in code_names() if not any(k in USED for k in keys))
    assert unlisted == [], f"binding names the code reaches but trt_names.USED lacks: {unlisted}"
    matched = {k for keys, _ in code_names() for k in keys}
    assert sorted(set(USED) - matched) == [], "trt_names.USED lists names the code no longer reaches"


# --- what the real bindings have ---------------------------------------------------------------------------------

@functools.cache
def rtx_module():
    return pytest.importorskip("tensorrt_rtx")


def rtx_has(path: str) -> bool:
    """Whether the installed TensorRT-RTX has this dotted name."""
    obj = rtx_module()
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def used_problems(table: dict, has_rtx: Callable[[str], bool]) -> list[str]:
    """The USED names a flavour whose code path reaches them lacks."""
    problems = []
    for name, flavors in sorted(USED.items()):
        if TRT in flavors and not trt_names.datacenter_has(name, FLOOR[TRT], table):
            problems.append(f"{name}: datacenter TensorRT {'.'.join(map(str, FLOOR[TRT]))}+ lacks it")
        if RTX in flavors and not has_rtx(name):
            problems.append(f"{name}: tensorrt_rtx {rtx_module().__version__} lacks it")
    return problems


def public(obj: object) -> set[str]:
    """A fake's public names: its class's and, for an instance, its own; an enum's members; no record (_name)."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return set(obj.__members__)
    cls = obj if isinstance(obj, type) else type(obj)
    names = {n for klass in cls.__mro__ if klass is not object for n in vars(klass)}
    names |= set(vars(obj)) if not isinstance(obj, type) else set()
    return {n for n in names if not n.startswith("_")}


def sample(cls: type) -> object:
    """An instance of a fake class, made with placeholder arguments."""
    if cls in (fake_trt.FakeEngine,):
        return cls(None, {"x": (True, None, (1,))}, {"x": {"min": (1,), "opt": (1,), "max": (1,)}})
    if cls in (fake_trt.FakeContext, fake_trt.FakeRtxContext):
        return cls(sample(fake_trt.FakeEngine))
    required = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    return cls(*[None] * len(required))


FAKE_CLASSES = [fake_trt.FakeEngine, fake_trt.FakeContext, fake_trt.FakeRtxContext, fake_trt.FakeRefitter,
                fake_trt.FakeWeights]


def class_problems(table: dict, has_rtx: Callable[[str], bool]) -> list[str]:
    """Names the fake engine, context, refitter and weights have that a flavour they stand for lacks."""
    problems = []
    for cls in FAKE_CLASSES:
        flavors = getattr(cls, "_flavors", (TRT, RTX))
        for name in sorted(public(sample(cls))):
            key = f"{cls._binding}.{name}"
            if RTX in flavors and not has_rtx(key):
                problems.append(f"{cls.__name__}.{name}: tensorrt_rtx has no {key}")
            if TRT in flavors and not trt_names.datacenter_has(key, FLOOR[TRT], table):
                problems.append(f"{cls.__name__}.{name}: datacenter TensorRT has no {key}")
    return problems


def module_problems(version: str, table: dict) -> list[str]:
    """Names the fake datacenter module of a version has that this TensorRT release lacks."""
    at, trt = trt_names.version(version), fake_trt.fake_tensorrt(version)
    problems = []

    def check(key: str, obj: object) -> None:
        if not trt_names.datacenter_has_at(key, at, table):
            problems.append(f"fake tensorrt {version}: {key} is not in TensorRT {version}")
        if isinstance(obj, type):
            for name in sorted(public(obj if issubclass(obj, enum.Enum) else sample(obj))):
                check(f"{key}.{name}", getattr(obj, name, None))

    for name, obj in sorted(fake_trt.fake_module_classes(trt).items()):
        if obj in FAKE_CLASSES:  # their members are checked with the classes
            obj = None
        check(name, obj)
    return problems


def test_names_the_code_reaches_exist_in_their_flavours():
    assert used_problems(DATACENTER, rtx_has) == []


def test_fake_classes_exist_on_both_real_bindings():
    assert class_problems(DATACENTER, rtx_has) == []
    assert not hasattr(fake_trt.FakeContext, "is_stream_capturable")  # datacenter TensorRT has none
    assert "is_stream_capturable" not in {k.split(".")[-1] for k in DATACENTER}


@pytest.mark.parametrize("version", ["10.14.1.48", "11.1.0.5"])
def test_fake_datacenter_module_exists_in_that_release(version):
    assert module_problems(version, DATACENTER) == []


def test_fake_stream_is_torchs():
    missing = {name for name in public(fake_trt.FakeStream) if not hasattr(torch.cuda.Stream, name)}
    if not torch.backends.cuda.is_built():  # a CPU-only torch's Stream lacks its C base (cuda_stream lives there)
        missing -= {"cuda_stream"}
    assert missing == set()


@pytest.mark.parametrize("removed", ["IExecutionContext.execute_async_v3", "ICudaEngine.weight_streaming_budget_v2",
                                     "Refitter.refit_cuda_engine_async", "BuilderFlag.WEIGHT_STREAMING"])
def test_a_name_removed_from_the_real_bindings_is_reported(removed):
    """Take one name out of a copy of the datacenter table, or hide it in TensorRT-RTX: the checks name it."""
    table = {k: v for k, v in DATACENTER.items() if k != removed}
    reported = used_problems(table, rtx_has) + class_problems(table, rtx_has) + module_problems("10.14.1.48", table)
    assert reported and all(removed in line for line in reported), reported
    assert f"{removed}: datacenter TensorRT 10.14+ lacks it" in reported  # the code calls it on datacenter TensorRT
    hidden = used_problems(DATACENTER, lambda name: name != removed and rtx_has(name))
    assert hidden == [f"{removed}: tensorrt_rtx {rtx_module().__version__} lacks it"]


def test_a_name_the_code_calls_that_one_flavour_lacks_fails():
    """is_stream_capturable is TensorRT-RTX only: listed for datacenter TensorRT too, the check fails."""
    name = "IExecutionContext.is_stream_capturable"
    assert USED[name] == (RTX,)
    original = USED[name]
    USED[name] = (TRT, RTX)
    try:
        assert used_problems(DATACENTER, rtx_has) == [f"{name}: datacenter TensorRT 10.14+ lacks it"]
    finally:
        USED[name] = original


def test_the_scan_sees_an_unlisted_call(tmp_path):
    """A new binding call in engines/ that USED lacks is found by the scan."""
    source = tmp_path / "new.py"
    source.write_text("def f(exec_ctx, api):\n    exec_ctx.execute_async_v4(0)\n    return api.trt.BuilderFlag.FP4\n")
    found = {keys for keys, _ in scan(source)}
    assert found == {("IExecutionContext.execute_async_v4",), ("BuilderFlag.FP4",)}
    assert not any(k in USED for keys in found for k in keys)
