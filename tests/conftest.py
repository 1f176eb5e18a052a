"""Session fixtures shared by all tests: the tiny synthetic checkpoint in both layouts, fully offline. Also how the
suite runs under pytest-xdist (`make test` runs `-n 2`): each expensive artefact is made once per run, by whichever
worker asks first (`shared`); with `--dist loadfile` each test file runs whole on one worker (its module fixtures
made once), the serve tests together (their package fixtures: one server); `serial` tests run alone."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

T = TypeVar("T")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under xdist; None in a plain run
if WORKER is not None:  # one thread per worker: two workers on two cores, torch's threads would only wait on each other
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"  # and in the subprocesses the tests start
    torch.set_num_threads(1)

# Test files that run on one worker together under xdist: the users of the package fixture `served` (one server),
# and the two users of the quantization runs (tests/quant/conftest.py), which would otherwise wait on each other.
GROUPED = {**{f"tests/serve/{name}": "tests/serve (served)"
              for name in ("test_abuse_limits.py", "test_loadgen.py", "test_openai_api.py", "test_page.py",
                           "test_safety.py")},
           **{f"tests/quant/{name}": "tests/quant (runs)" for name in ("test_qdq_onnx.py", "test_quantize.py")}}


def run_folder(config: pytest.Config) -> Path | None:
    """The folder all xdist workers of this run share (each worker's --basetemp is a folder in it); None unless
    running as an xdist worker."""
    basetemp = config.option.basetemp
    return Path(basetemp).parent if WORKER and basetemp else None


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) for the block: exclusive, or shared with fcntl.LOCK_SH."""
    with open(path, "a") as handle:
        fcntl.flock(handle, mode)
        yield


def shared(config: pytest.Config, name: str, make: Callable[[], T]) -> T:
    """make() once per run: in a plain run simply make(); under xdist the first worker to ask makes it (its folders
    live in that worker's temp folder for the whole run) and every other worker waits, then gets the same value."""
    root = run_folder(config)
    if root is None:
        return make()
    done = root / f"shared-{name}.pickle"
    with flocked(root / f"shared-{name}.lock"):
        if not done.exists():
            value = make()
            done.write_bytes(pickle.dumps(value))
            return value
    return pickle.loads(done.read_bytes())


def group(nodeid: str) -> str:
    """The unit of work a test belongs to under `--dist loadfile`: its file, or its GROUPED name."""
    path = nodeid.split("::", 1)[0]
    return GROUPED.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile`, with the GROUPED files one unit, the units in the order the workers run their tests in
    (see pytest_collection_modifyitems), not by their number of tests."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileOrGroup(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group(nodeid)

    config.option.loadscopereorder = False
    return FileOrGroup(config, log)


# The units that make the artefacts other units wait longest for, first and longest first (~75 s: klein_onnx; ~45 s:
# tiny_onnx and slim_ckpt): started together on the two workers, their users then find them made instead of waiting.
MAKERS = ("tests/klein/test_klein_export.py", "tests/benchmarks/test_bench.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist the MAKERS go first, then the units holding a `slow` test, so that a long one does not end the run
    alone, and the units holding a `serial` test last, when what runs beside them is short (a serial test waits for
    it)."""
    if WORKER is not None:
        def units(mark: str) -> set[str]:
            return {group(item.nodeid) for item in items if item.get_closest_marker(mark)}

        slow, serial = units("slow"), units("serial")

        def rank(item: pytest.Item) -> tuple[int, int]:
            unit = group(item.nodeid)
            if unit in MAKERS:
                return 0, MAKERS.index(unit)
            return (3 if unit in serial else 1 if unit in slow else 2), 0

        items.sort(key=rank)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under xdist a `serial` test (its setup and teardown included) runs alone: every test holds a shared lock while
    it runs, a serial one an exclusive lock; a turnstile lets a waiting serial test in before the next shared one."""
    root = run_folder(item.config)
    if root is None:
        yield
        return
    serial = item.get_closest_marker("serial") is not None
    with contextlib.ExitStack() as held:
        turnstile = held.enter_context(open(root / "turnstile.lock", "a"))
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(held.enter_context(open(root / "serial.lock", "a")), fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        if not serial:
            fcntl.flock(turnstile, fcntl.LOCK_UN)  # a serial test keeps it: the next shared test waits behind it
        yield


@pytest.fixture(scope="session")
def tensorrt_gpu():
    """(TrtApi, Gpu) that builds and runs engines on this host's GPU, or a skip saying what is missing
    (engines.select.tensorrt_for_this_gpu: the GPU, its SKU, the TensorRT flavour that runs it, its compute
    capability; the dev extras bring TensorRT-RTX only, so a datacenter GPU host skips with the install hint)."""
    from kontext_trt.core.errors import KontextError
    from kontext_trt.engines.select import tensorrt_for_this_gpu

    try:
        return tensorrt_for_this_gpu()
    except KontextError as exc:
        pytest.skip(f"no GPU with a usable TensorRT here: {exc}")


@pytest.fixture(scope="session")
def once(pytestconfig) -> Callable[[str, Callable[[], T]], T]:
    """once(name, make): make() once per run, whichever xdist worker asks first (see `shared`). For the session
    fixtures that write an artefact (checkpoint, export, engines, calibration): read it, never change it in place."""
    return lambda name, make: shared(pytestconfig, name, make)


@pytest.fixture(scope="session")
def tiny_ckpt(once, tmp_path_factory) -> Path:
    """The tiny preset, seed 0, in the diffusers (HF snapshot) layout."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("tiny_ckpt", lambda: write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="session")
def klein_tiny_ckpt(once, tmp_path_factory) -> Path:
    """synth --preset klein-tiny, seed 0: a step-distilled FLUX.2 [klein] in diffusers layout."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("klein_tiny_ckpt", lambda: write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "klein-tiny",
                                                                      preset="klein-tiny"))


@pytest.fixture(scope="session")
def klein_tiny_base_ckpt(once, tmp_path_factory) -> Path:
    """synth --preset klein-tiny-base, seed 0: a base FLUX.2 [klein] (true CFG)."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("klein_tiny_base_ckpt", lambda: write_synthetic_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "klein-tiny-base", preset="klein-tiny-base"))


@pytest.fixture(scope="session")
def tiny_bfl_ckpt(once, tmp_path_factory) -> Path:
    """The same weights as BFL single files plus the HF text encoder folders."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("tiny_bfl_ckpt",
                lambda: write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bfl", fmt="bfl"))


@pytest.fixture(scope="session")
def shapes_ckpt(once, tmp_path_factory) -> Path:
    """The trained shapes model that ships with the package, in the diffusers layout (T5 at 32 tokens)."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("shapes_ckpt",
                lambda: write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "shapes", preset="shapes"))


@pytest.fixture(scope="session")
def tiny_ckpt_t32(once, tmp_path_factory) -> Path:
    """The tiny preset, seed 0, diffusers layout, whose T5 reads 32 tokens (tokenizer_2's model_max_length 32)."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("tiny_ckpt_t32",
                lambda: write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-t32", text_length=32))


@pytest.fixture(scope="session")
def tiny_onnx_t32(once, tiny_ckpt_t32, tmp_path_factory) -> Path:
    """All five stages of tiny_ckpt_t32 exported once, fp32: T5 text static at 32 tokens."""
    from kontext_trt.export.export import export_checkpoint

    return once("tiny_onnx_t32", lambda: export_checkpoint(
        tiny_ckpt_t32, tmp_path_factory.mktemp("onnx") / "tiny-t32", dtype="fp32").parent)


@pytest.fixture(scope="session")
def tiny_onnx(once, tiny_ckpt, tmp_path_factory) -> Path:
    """All five tiny stages exported once, fp32, opset 23: the folder holding manifest.json (the engines' hook)."""
    from kontext_trt.export.export import export_checkpoint

    return once("tiny_onnx", lambda: export_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny",
                                                       dtype="fp32").parent)


@pytest.fixture(scope="session")
def tiny_onnx_split(once, tiny_ckpt, tiny_onnx, tmp_path_factory) -> Path:
    """A copy of tiny_onnx with the transformer's three parts (step caching) exported beside the transformer."""
    import shutil

    from kontext_trt.core.stages import TRANSFORMER_PARTS
    from kontext_trt.export.export import export_checkpoint

    def make() -> Path:
        out = tmp_path_factory.mktemp("onnx") / "tiny-split"
        shutil.copytree(tiny_onnx, out)
        return export_checkpoint(tiny_ckpt, out, TRANSFORMER_PARTS, dtype="fp32").parent
    return once("tiny_onnx_split", make)


@pytest.fixture(scope="session")
def slim_ckpt(once, tmp_path_factory) -> Path:
    """The slim preset (real widths, 1 double + 1 single block, ~1.6 GB on disk), for @pytest.mark.slow tests."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return once("slim_ckpt",
                lambda: write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "slim", preset="slim"))


class FlagAfter:
    """A safety checker that passes its first `passing_calls` calls and flags every image after them."""

    def __init__(self, passing_calls: int = 0) -> None:
        self.passing_calls, self.calls = passing_calls, 0

    def __call__(self, images):
        from kontext_trt.safety.checker import Verdict

        self.calls += 1
        flagged = self.calls > self.passing_calls
        return [Verdict({"TEST_LABEL": 0.9} if flagged else {}, "fake") for _ in images]


class FlagEverything(FlagAfter):
    """Flags every image it sees: an edit's input is refused."""


class FlagOutputs(FlagAfter):
    """Passes the first call (an edit's input image), flags every image after it (its outputs)."""

    def __init__(self) -> None:
        super().__init__(passing_calls=1)


@pytest.fixture
def fake_checkers(monkeypatch) -> str:
    """The fakes above as an importable module `fake_checkers`, for --safety-checker fake_checkers:NAME."""
    import sys
    import types

    module = types.ModuleType("fake_checkers")
    module.FlagAfter, module.FlagEverything, module.FlagOutputs = FlagAfter, FlagEverything, FlagOutputs
    monkeypatch.setitem(sys.modules, "fake_checkers", module)
    return "fake_checkers"


@pytest.fixture(scope="session")
def c2pa_chain(tmp_path_factory) -> tuple[Path, Path]:
    """A throwaway CA and an end-entity certificate with the extensions C2PA requires (digitalSignature key
    usage, emailProtection EKU, not a CA, key identifiers), written as chain.pem (leaf first) and key.pem."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kontext-trt tests")])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                                  critical=False))
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                            critical=False)
        return builder.sign(signer, hashes.SHA256())

    root = cert("kontext-trt test root", ca_key, name("kontext-trt test root"), ca_key, ca=True)
    leaf = cert("kontext-trt test signer", leaf_key, root.subject, ca_key, ca=False)
    folder = tmp_path_factory.mktemp("c2pa")
    chain, key = folder / "chain.pem", folder / "key.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, root)))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key


@pytest.fixture
def cli_logging():
    """Logging set up as the CLI sets it (WARNING and up on stderr), for tests that call library code directly and
    read its warnings from stderr."""
    from kontext_trt.cli.main import set_log_level

    level = logging.getLogger().level
    set_log_level(logging.WARNING)
    yield
    logging.getLogger().setLevel(level)
