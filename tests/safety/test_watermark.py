"""The invisible watermark: survives JPEG q90, is absent from unmarked images, reads with the library's decoder."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from kontext_trt.core import image as im
from kontext_trt.safety import watermark as wm


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def textured(width: int, height: int) -> Image.Image:
    noise = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3)), np.float32)
    return Image.fromarray((0.5 * blurred + 0.5 * np.asarray(im.sample_image(width, height), np.float32)).astype(np.uint8))


@pytest.mark.parametrize("make", [im.sample_image, textured])
@pytest.mark.parametrize("size", [(512, 384), (1024, 1024)])
def test_mark_survives_jpeg_q90_and_is_absent_unmarked(make, size):
    original = make(*size)
    marked = wm.embed(original)
    assert wm.read(marked).bit_accuracy == 1.0
    after_jpeg = wm.read(jpeg(marked))
    assert after_jpeg.present and after_jpeg.bit_accuracy >= 46 / 48
    for unmarked in (original, jpeg(original)):
        reading = wm.read(unmarked)
        assert not reading.present and reading.bit_accuracy < 0.75
    # Invisible: no pixel moves more than 13 levels, PSNR above 40 dB.
    diff = np.asarray(marked, np.float32) - np.asarray(original, np.float32)
    assert np.abs(diff).max() <= 13 and 10 * np.log10(255 ** 2 / (diff ** 2).mean()) > 40


def test_library_decoder_reads_our_mark():
    imwatermark = pytest.importorskip("imwatermark")
    marked = wm.embed(im.sample_image(512, 384))
    bgr = np.asarray(marked)[:, :, ::-1].copy()
    bits = imwatermark.WatermarkDecoder("bits", 48).decode(bgr, "dwtDct", scales=[wm.SCALE, 0, 0])
    assert np.array_equal(np.asarray(bits, np.uint8), wm.BITS)


def test_payload_names_the_toolkit_in_48_bits():
    assert wm.PAYLOAD == b"KTRT01" and wm.BITS.shape == (48,)


def test_small_images_are_refused_and_read_as_unmarked():
    small = im.sample_image(128, 96)
    with pytest.raises(ValueError, match="too small"):
        wm.embed(small)
    assert not wm.read(small).present
