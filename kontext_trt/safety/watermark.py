"""Invisible watermark: the dwtDct scheme of `invisible-watermark` (used by BFL's and Stability's reference code),
carrying a fixed 48-bit payload that names this toolkit, on the luma channel.

The scheme: take the Haar LL band of the image (each 2x2 pixel block -> (a+b+c+d)/2), cut it into 4x4 blocks, and
in each block quantise the largest-magnitude value (the first one excluded) onto a lattice of step `SCALE`: the
remainder sits at 1/4 of a step for a 0 bit, at 3/4 for a 1 bit; block k carries bit k mod 48. Reading takes the
same value of each block, votes per bit, and compares the 48 bits read with the payload.

Written here in numpy rather than called through `imwatermark.WatermarkEncoder` because that encoder swaps the
horizontal and vertical detail bands when it rebuilds the image (edges smear), truncates float results into
uint8, loops over blocks in Python (~0.5 s per megapixel), and marks only the U chroma channel, which JPEG's 4:2:0
subsampling erases. Marks written here read back with the library's own decoder
(`WatermarkDecoder("bits", 48).decode(bgr, "dwtDct", scales=[SCALE, 0, 0])`); the tests check that.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PAYLOAD = b"KTRT01"  # 48 bits: "kontext-trt", mark version 1
BITS = np.unpackbits(np.frombuffer(PAYLOAD, np.uint8))
SCALE = 24.0  # lattice step in the luma LL band: about +-6 levels per pixel, PSNR ~47 dB
BLOCK = 4
MIN_PIXELS = 256 * 256  # smaller images hold too few blocks to vote reliably (the library's own limit)
PRESENT_AT = 41 / 48  # bits that must match; an unmarked image reaches this with probability ~3e-7
# BT.601 luma, as OpenCV's BGR2YUV (which the library's decoder uses).
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class MarkReading:
    """What reading an image found: the share of payload bits that matched, and whether that means marked."""

    bit_accuracy: float
    present: bool


def _blocks(ll: np.ndarray) -> np.ndarray:
    """A view-free copy of the LL band cut into (n_blocks, 16), blocks in row-major order."""
    rows, cols = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    return ll[:rows * BLOCK, :cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(-1, 16)


def _luma_ll(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB float -> the Haar LL band of its luma, (H//4*2, W//4*2)."""
    h, w = pixels.shape[0] // 4 * 4, pixels.shape[1] // 4 * 4
    y = pixels[:h, :w] @ LUMA
    return y.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3)) / 2


def _peaks(blocks: np.ndarray) -> np.ndarray:
    """Index (1..15) of each block's largest-magnitude value, the first value excluded."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def embed(image: Image.Image, bits: np.ndarray = BITS, scale: float = SCALE) -> Image.Image:
    """The image with the payload marked into its luma (a copy; images under 256x256 pixels are refused)."""
    if image.width * image.height < MIN_PIXELS:
        raise ValueError(f"{image.width}x{image.height} is too small to carry the watermark (needs 256x256 pixels)")
    pixels = np.asarray(image.convert("RGB"), np.float32)
    ll = _luma_ll(pixels)
    blocks = _blocks(ll)
    n = len(blocks)
    peak = _peaks(blocks)
    value = blocks[np.arange(n), peak]
    bit = bits[np.arange(n) % len(bits)]
    magnitude = (np.abs(value) // scale + 0.25 + 0.5 * bit) * scale
    # Keep the marked value the block's peak, so the reader finds it again: move up one step if it would not be.
    others = np.abs(blocks).copy()
    others[:, 0] = 0
    others[np.arange(n), peak] = 0
    magnitude = np.where(magnitude <= others.max(axis=1) + 2, magnitude + scale, magnitude)
    delta_blocks = np.zeros_like(blocks)
    delta_blocks[np.arange(n), peak] = np.where(value >= 0, magnitude, -magnitude) - value
    rows, cols = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    delta_ll = np.zeros_like(ll)
    delta_ll[:rows * BLOCK, :cols * BLOCK] = (
        delta_blocks.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK))
    # A change d of an LL value moves each of its 2x2 pixels' luma by d/2; equal RGB steps move luma alone.
    delta = np.repeat(np.repeat(delta_ll / 2, 2, axis=0), 2, axis=1)
    out = pixels.copy()
    out[:delta.shape[0], :delta.shape[1]] += delta[..., None]
    return Image.fromarray(out.clip(0, 255).round().astype(np.uint8))


def read(image: Image.Image, bits: np.ndarray = BITS, scale: float = SCALE) -> MarkReading:
    """Vote each payload bit over the blocks that carry it and compare with the payload."""
    if image.width * image.height < MIN_PIXELS:
        return MarkReading(0.0, False)
    blocks = _blocks(_luma_ll(np.asarray(image.convert("RGB"), np.float32)))
    n = len(blocks)
    value = np.abs(blocks[np.arange(n), _peaks(blocks)])
    votes = (value % scale > 0.5 * scale).astype(np.float32)
    ones = np.bincount(np.arange(n) % len(bits), weights=votes, minlength=len(bits))
    counts = np.bincount(np.arange(n) % len(bits), minlength=len(bits))
    found = ones / counts > 0.5
    accuracy = float((found == bits.astype(bool)).mean())
    return MarkReading(accuracy, accuracy >= PRESENT_AT)
