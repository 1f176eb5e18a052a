"""C2PA: a throwaway chain signs each output; c2pa.Reader reads back the actions, source type, agent, ingredient."""
import json
from importlib.metadata import version

import c2pa
import pytest

from kontext_trt.cli.main import main
from kontext_trt.core import image as im
from kontext_trt.core.errors import KontextError
from kontext_trt.safety.provenance import TRAINED_ALGORITHMIC_MEDIA, C2paCredentials, read_c2pa_manifest


def active_manifest(path):
    with open(path, "rb") as f, c2pa.Reader("image/png", f) as reader:
        return reader.get_active_manifest(), reader.get_validation_state(), json.loads(reader.json())


def actions(manifest):
    return [a for assertion in manifest["assertions"] if assertion["label"].startswith("c2pa.actions")
            for a in assertion["data"]["actions"]]


def test_edit_signs_manifest_with_input_as_ingredient(capsys, tiny_ckpt, tmp_path, c2pa_chain):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    im.sample_image(256, 256).save(source)
    cert, key = c2pa_chain
    code = main([str(a) for a in ("edit", "--model", tiny_ckpt, "--image", source, "--prompt", "add a moon",
                                  "--out", out, "--steps", 1, "--no-auto-resize", "--dtype", "fp32",
                                  "--c2pa-cert", cert, "--c2pa-key", key)])
    stdout, err = capsys.readouterr()
    assert code == 0 and "no C2PA manifest" not in err and "c2pa_sign" in stdout
    manifest, state, report = active_manifest(out)
    # Signed and intact; the throwaway root is in no trust list, so that is the only failure.
    assert state == "Valid"
    assert [s["code"] for s in report["validation_status"]] == ["signingCredential.untrusted"]
    assert manifest["signature_info"]["common_name"] == "kontext-trt test signer"
    agent = {"name": "kontext-trt", "version": version("kontext-trt")}
    assert [(a["action"], a.get("digitalSourceType"), a.get("softwareAgent")) for a in actions(manifest)] == [
        ("c2pa.opened", None, None), ("c2pa.edited", TRAINED_ALGORITHMIC_MEDIA, agent)]
    sha = json.loads(im.Image.open(out).text["kontext-trt"])["input_sha256"]
    [ingredient] = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["instance_id"] == f"sha256:{sha}"
    assert "thumbnail" not in ingredient and "data" not in ingredient  # identified by hash, not embedded
    assert manifest["claim_generator_info"][0]["name"] == "kontext-trt"
    # The PNG metadata and the watermark survive signing; verify reports both.
    assert json.loads(im.Image.open(out).text["kontext-trt"])["watermark"] == "dwtDct luma KTRT01"
    assert main(["verify", str(out)]) == 0
    stdout, _ = capsys.readouterr()
    assert "watermark: present" in stdout and "c2pa: Valid, signed by kontext-trt test signer" in stdout
    assert f"action c2pa.edited by kontext-trt {version('kontext-trt')} {TRAINED_ALGORITHMIC_MEDIA}" in stdout


def test_text_to_image_is_created(capsys, tiny_ckpt, tmp_path, c2pa_chain):
    out = tmp_path / "t2i.png"
    cert, key = c2pa_chain
    code = main([str(a) for a in ("edit", "--model", tiny_ckpt, "--prompt", "a cat", "--out", out, "--steps", 1,
                                  "--width", 64, "--height", 64, "--dtype", "fp32", "--safety-checker", "none",
                                  "--c2pa-cert", cert, "--c2pa-key", key)])
    assert code == 0
    manifest = read_c2pa_manifest(out)["manifest"]
    assert [(a["action"], a["digitalSourceType"]) for a in actions(manifest)] == [
        ("c2pa.created", TRAINED_ALGORITHMIC_MEDIA)]
    assert manifest.get("ingredients", []) == []


def test_unmarked_file_has_no_manifest(tmp_path):
    path = tmp_path / "plain.png"
    im.sample_image(64, 64).save(path)
    assert read_c2pa_manifest(path) is None


def test_bad_credentials(tmp_path, c2pa_chain):
    cert, key = c2pa_chain
    with pytest.raises(KontextError, match="cannot read"):
        C2paCredentials.load(tmp_path / "missing.pem", key)
    (tmp_path / "junk.pem").write_text("not a pem")
    with pytest.raises(KontextError, match="not a PEM chain"):
        C2paCredentials.load(tmp_path / "junk.pem", key)
    with pytest.raises(KontextError, match="does not belong to the first certificate"):
        root_first = tmp_path / "root-first.pem"
        pems = cert.read_text().split("-----END CERTIFICATE-----\n")
        root_first.write_text(pems[1] + "-----END CERTIFICATE-----\n" + pems[0] + "-----END CERTIFICATE-----\n")
        C2paCredentials.load(root_first, key)


def test_cert_without_key_is_refused(capsys, tiny_ckpt, tmp_path, c2pa_chain):
    code = main([str(a) for a in ("edit", "--model", tiny_ckpt, "--prompt", "x", "--out", tmp_path / "o.png",
                                  "--c2pa-cert", c2pa_chain[0])])
    assert code == 2 and "give both --c2pa-cert and --c2pa-key" in capsys.readouterr().err


def test_jpeg_output_is_signed_and_keeps_the_mark(capsys, tiny_ckpt, tmp_path, c2pa_chain):
    source, out = tmp_path / "in.png", tmp_path / "out.jpg"
    im.sample_image(256, 256).save(source)
    cert, key = c2pa_chain
    code = main([str(a) for a in ("edit", "--model", tiny_ckpt, "--image", source, "--prompt", "add a moon",
                                  "--out", out, "--steps", 1, "--no-auto-resize", "--dtype", "fp32",
                                  "--safety-checker", "none", "--c2pa-cert", cert, "--c2pa-key", key)])
    assert code == 0
    report = read_c2pa_manifest(out)
    assert report["validation_state"] == "Valid"
    assert [a["action"] for a in actions(report["manifest"])] == ["c2pa.opened", "c2pa.edited"]
    assert main(["verify", str(out)]) == 0
    stdout, _ = capsys.readouterr()
    assert "watermark: present" in stdout and "c2pa: Valid" in stdout
