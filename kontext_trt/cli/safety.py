"""Safety options of edit/demo (--safety-checker, --c2pa-cert, --c2pa-key) and the `verify` subcommand."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kontext_trt.core.specs import SafetySpec


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register verify."""
    p = sub.add_parser("verify", help="report an image's invisible watermark and C2PA manifest")
    p.add_argument("image", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=run_verify)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """What edit and demo do with results: the safety checker and C2PA signing."""
    p.add_argument("--safety-checker", default="nudenet", metavar="nudenet|none|module:callable",
                   help="checks the input and every output; a flagged image is not written (default: nudenet)")
    p.add_argument("--c2pa-cert", type=Path, metavar="CHAIN.pem", help="sign a C2PA manifest into each output with "
                   "this certificate chain (end entity first) ...")
    p.add_argument("--c2pa-key", type=Path, metavar="KEY.pem", help="... and this private key")


def output_spec(args: argparse.Namespace) -> SafetySpec:
    """The SafetySpec of parsed --safety-checker/--c2pa-cert/--c2pa-key."""
    return SafetySpec(args.safety_checker, args.c2pa_cert, args.c2pa_key)


def output_policy(args: argparse.Namespace, device: str = "cpu"):
    """The OutputPolicy for parsed edit/demo arguments (the checker loaded on `device`)."""
    from kontext_trt.safety.guard import OutputPolicy

    spec = output_spec(args)
    return OutputPolicy.from_options(spec.checker, spec.c2pa_cert, spec.c2pa_key, device)


def verify(path: Path) -> dict:
    """Watermark reading and C2PA manifest of one image file."""
    from kontext_trt.core.image import load_image
    from kontext_trt.safety import watermark
    from kontext_trt.safety.provenance import read_c2pa_manifest

    reading = watermark.read(load_image(path))
    return {"image": str(path), "watermark": {"present": reading.present, "bit_accuracy": reading.bit_accuracy,
                                              "payload": watermark.PAYLOAD.decode()},
            "c2pa": read_c2pa_manifest(path)}


def run_verify(args: argparse.Namespace) -> int:
    """kontext-trt verify: exit 0 whatever is found (the report says it); 2 for an unreadable file."""
    report = verify(args.image)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mark = report["watermark"]
    print(f"watermark: {'present' if mark['present'] else 'absent'} ({mark['payload']}, "
          f"{100 * mark['bit_accuracy']:.0f}% of bits match)")
    c2pa = report["c2pa"]
    if c2pa is None:
        print("c2pa: no manifest")
    elif "error" in c2pa:
        print(f"c2pa: unreadable manifest ({c2pa['error']})")
    else:
        manifest = c2pa["manifest"]
        signer = manifest.get("signature_info", {})
        print(f"c2pa: {c2pa['validation_state']}, signed by {signer.get('common_name')} ({signer.get('issuer')})")
        for assertion in manifest.get("assertions", []):
            for action in assertion.get("data", {}).get("actions", []) if assertion["label"].startswith(
                    "c2pa.actions") else []:
                agent = action.get("softwareAgent", {})
                agent = f" by {agent.get('name')} {agent.get('version')}" if agent else ""
                print(f"  action {action['action']}{agent} {action.get('digitalSourceType', '')}".rstrip())
        for ingredient in manifest.get("ingredients", []):
            print(f"  ingredient {ingredient.get('relationship')} {ingredient.get('instance_id')}")
        for status in c2pa["validation_status"]:
            print(f"  status {status['code']}: {status.get('explanation', '')}")
    return 0
