"""One PNG that shows an edit: input, instruction and output side by side, each scene scaled up for the eye."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

SCALE = 2
CAPTION = 28


def side_by_side(source: Image.Image | None, output: Image.Image, prompt: str, verdict: str = "") -> Image.Image:
    """[input | output] with the instruction above and an optional verdict line below (text-to-image: no input)."""
    tiles = [im.resize((im.width * SCALE, im.height * SCALE), Image.NEAREST) for im in (source, output) if im]
    width = sum(t.width for t in tiles) + 8 * (len(tiles) + 1)
    height = max(t.height for t in tiles) + 3 * CAPTION + 8
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((8, 8), f'"{prompt}"', fill=(0, 0, 0), font=font)
    x = 8
    for tile, label in zip(tiles, ["input", "output"] if source else ["output"]):
        sheet.paste(tile, (x, CAPTION + 8))
        draw.text((x, CAPTION + tile.height + 12), label, fill=(90, 90, 90), font=font)
        x += tile.width + 8
    if verdict:
        draw.text((8, 2 * CAPTION + tiles[-1].height + 4), verdict, fill=(0, 0, 0), font=font)
    return sheet
