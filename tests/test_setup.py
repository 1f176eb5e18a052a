"""The install itself: one namespace, one console script, exactly one ONNX Runtime, a CPU torch kept."""
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path


def test_one_onnxruntime_distribution():
    installed = {d.metadata["Name"].lower() for d in md.distributions()}
    runtimes = sorted(name for name in installed if name.startswith("onnxruntime") and "ep-" not in name)
    assert len(runtimes) == 1, runtimes


def test_namespace_maps_the_top_level_folders():
    top_level = md.distribution("kontext-trt").read_text("top_level.txt")
    assert top_level is None or top_level.split() in ([], ["kontext_trt"])


def test_console_script_lists_subcommands():
    exe = Path(sys.executable).with_name("kontext-trt")  # installed beside the interpreter running the tests
    assert exe.is_file(), f"no kontext-trt console script beside {sys.executable}"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("synth", "edit", "demo", "export", "quantize", "build", "check", "bench", "serve", "verify"):
        assert command in out


def test_test_module_names_are_unique():
    """pytest imports test modules by basename (rootdir, no packages): two files of one name stop the run at
    collection, as tests/serve/test_api.py and tests/runtime/test_api.py once did."""
    from collections import Counter

    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
