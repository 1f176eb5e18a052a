"""C2PA manifests (c2pa-python): sign each output with the user's certificate chain; read one back for `verify`.

The manifest says who made the image and how: the action c2pa.created (text to image) or c2pa.opened + c2pa.edited
(an edit), digitalSourceType trainedAlgorithmicMedia, this toolkit as the software agent, and for an edit the input
image as a parentOf ingredient identified by its SHA-256 (the input itself is not embedded).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from kontext_trt.core.errors import KontextError

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
NO_CERT_LINE = ("note: no C2PA manifest: pass --c2pa-cert CHAIN.pem --c2pa-key KEY.pem (an X.509 chain whose end-entity "
                "certificate has digitalSignature key usage and an emailProtection or documentSigning EKU) to sign one")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
ALGORITHMS = {"EC P-256": "es256", "EC P-384": "es384", "EC P-521": "es512", "Ed25519": "ed25519"}


@dataclass(frozen=True)
class C2paCredentials:
    """A PEM certificate chain (end entity first) and its PEM private key."""

    chain: bytes
    key: bytes
    alg: str

    @classmethod
    def load(cls, cert: str | Path, key: str | Path) -> "C2paCredentials":
        """Read --c2pa-cert and --c2pa-key, refusing files that are missing or that c2pa cannot use."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        try:
            chain, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
        except OSError as exc:
            raise KontextError(f"--c2pa-cert/--c2pa-key: cannot read {exc.filename}: pass existing PEM files") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except ValueError as exc:
            raise KontextError(f"--c2pa-cert/--c2pa-key: not a PEM chain and unencrypted PEM key ({exc})") from None
        if isinstance(private, ec.EllipticCurvePrivateKey):
            alg = ALGORITHMS.get(f"EC P-{private.curve.key_size}")
        elif isinstance(private, ed25519.Ed25519PrivateKey):
            alg = "ed25519"
        else:
            alg = None
        if alg is None:
            raise KontextError("--c2pa-key: use an EC P-256/P-384/P-521 or Ed25519 key (C2PA's ES256/384/512, Ed25519)")
        if leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
                != private.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo):
            raise KontextError("--c2pa-key does not belong to the first certificate of --c2pa-cert: put the "
                               "end-entity certificate first")
        return cls(chain, key_pem, alg)


def manifest_definition(title: str, mime: str, input_sha256: str | None) -> dict:
    """The manifest: actions, digital source type, software agent, and the input as a by-hash ingredient."""
    agent = {"name": "kontext-trt", "version": version("kontext-trt")}
    made = {"digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent}
    if input_sha256 is None:
        actions, ingredients = [{"action": "c2pa.created", **made}], []
    else:
        ingredients = [{"title": "input image (RGB pixels)", "relationship": "parentOf",
                        "instance_id": f"sha256:{input_sha256}", "label": "input"}]
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["input"]}},
                   {"action": "c2pa.edited", **made}]
    return {"claim_generator_info": [agent], "title": title, "format": mime, "ingredients": ingredients,
            "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}]}


def sign(data: bytes, mime: str, title: str, credentials: C2paCredentials, input_sha256: str | None) -> bytes:
    """The image file `data` with a signed C2PA manifest embedded."""
    import c2pa

    info = c2pa.C2paSignerInfo(credentials.alg, credentials.chain, credentials.key, None)
    try:
        with c2pa.Signer.from_info(info) as signer, \
                c2pa.Builder(json.dumps(manifest_definition(title, mime, input_sha256))) as builder:
            dest = io.BytesIO()
            builder.sign(signer, mime, io.BytesIO(data), dest)
    except c2pa.C2paError as exc:
        raise KontextError(f"C2PA signing failed ({str(exc).splitlines()[0][:200]}): check that --c2pa-cert is the "
                           f"chain of --c2pa-key with C2PA's required extensions") from None
    return dest.getvalue()


def read_c2pa_manifest(path: str | Path) -> dict | None:
    """The active manifest of a file with its validation state, or None when it carries no C2PA data."""
    import c2pa

    mime = MIME.get(Path(path).suffix.lower())
    if mime is None:
        return None
    with open(path, "rb") as f:
        try:
            reader = c2pa.Reader.try_create(mime, f)
        except c2pa.C2paError as exc:
            return {"error": str(exc).splitlines()[0]}
        if reader is None:
            return None
        with reader:
            manifest = reader.get_active_manifest() or {}
            return {"manifest": manifest, "validation_state": reader.get_validation_state(),
                    "validation_status": json.loads(reader.json()).get("validation_status", [])}
