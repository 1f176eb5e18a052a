"""Session fixtures shared by all tests: the tiny synthetic checkpoint in both layouts, fully offline."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


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
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny preset, seed 0, in the diffusers (HF snapshot) layout."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bfl_ckpt(tmp_path_factory) -> Path:
    """The same weights as BFL single files plus the HF text encoder folders."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bfl", fmt="bfl")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    """All five tiny stages exported once, fp32, opset 23: the folder holding manifest.json (the engines' hook)."""
    from kontext_trt.export.export import export_checkpoint

    return export_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny", dtype="fp32").parent


@pytest.fixture(scope="session")
def tiny_onnx_split(tiny_ckpt, tiny_onnx, tmp_path_factory) -> Path:
    """A copy of tiny_onnx with the transformer's three parts (step caching) exported beside the transformer."""
    import shutil

    from kontext_trt.core.stages import TRANSFORMER_PARTS
    from kontext_trt.export.export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "tiny-split"
    shutil.copytree(tiny_onnx, out)
    return export_checkpoint(tiny_ckpt, out, TRANSFORMER_PARTS, dtype="fp32").parent


@pytest.fixture(scope="session")
def slim_ckpt(tmp_path_factory) -> Path:
    """The slim preset (real widths, 1 double + 1 single block, ~1.6 GB on disk), for @pytest.mark.slow tests."""
    from kontext_trt.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "slim", preset="slim")


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
