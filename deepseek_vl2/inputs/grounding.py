"""Grounding output: parsing `<|ref|>...<|/ref|><|det|>[[...]]<|/det|>` and drawing the boxes.

The model answers a grounding request with spans such as

    <|ref|>The giraffe at the back<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>

where each box is `[x1, y1, x2, y2]` on a 0..999 grid relative to the original width and height of
the last image in the request. Parsing is deliberately forgiving because the text comes from a
sampling model:

* a `<|ref|>` span counts only when a `<|det|>` span follows it directly (whitespace allowed);
  a ref without boxes is ordinary text and is ignored instead of invalidating the whole answer;
* a box that is not exactly four numbers is skipped, the other boxes of the label are kept;
* coordinates are clamped to the 0..999 grid, and reversed corners (x1 > x2 or y1 > y2) are
  swapped, since the model still located the object, only the corner order is off;
* the label is drawn 20 px above the box as in the reference, but moved down to stay inside the
  image when the box touches the top edge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

GRID_MAX = 999
BOX_OUTLINE_WIDTH = 3
LABEL_FONT_SIZE = 20
LABEL_OFFSET_Y = 20

# The reference demo's 13 colours, cycled per label.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (0, 255, 255),
    (255, 255, 0),
    (255, 0, 255),
    (127, 127, 127),
    (255, 255, 127),
    (255, 127, 255),
    (127, 255, 255),
    (127, 127, 255),
    (127, 255, 127),
    (255, 127, 127),
)

# A label may hold any text except another <|ref|> (so an unpaired ref cannot swallow the next
# one); a det payload is only numbers and brackets, so it may not contain "<" at all.
_REF_THEN_DET = re.compile(
    r"<\|ref\|>((?:(?!<\|ref\|>).)*?)<\|/ref\|>\s*<\|det\|>([^<]*)<\|/det\|>", re.DOTALL
)
# Innermost bracket groups of a det payload: "[[1, 2, 3, 4], [5, 6, 7, 8]]" -> "1, 2, 3, 4", ...
_INNER_BRACKETS = re.compile(r"\[([^\[\]]*)\]")

GridBox = tuple[int, int, int, int]
PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class GroundedObject:
    """One referred object: its label and its boxes on the 0..999 grid."""

    label: str
    boxes: tuple[GridBox, ...]


def _parse_coordinate(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return min(max(int(value), 0), GRID_MAX)


def _parse_box(text: str) -> GridBox | None:
    parts = text.split(",")
    if len(parts) != 4:
        return None
    coordinates = [_parse_coordinate(part.strip()) for part in parts]
    if any(value is None for value in coordinates):
        return None
    x1, y1, x2, y2 = coordinates
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def parse_grounding(text: str) -> list[GroundedObject]:
    """All labelled boxes in a model answer, in order; labels without a valid box are dropped."""
    objects = []
    for label, payload in _REF_THEN_DET.findall(text):
        boxes = tuple(
            box for box in map(_parse_box, _INNER_BRACKETS.findall(payload)) if box is not None
        )
        if boxes:
            objects.append(GroundedObject(label=label.strip(), boxes=boxes))
    return objects


def to_pixel_box(box: GridBox, width: int, height: int) -> PixelBox:
    """Map a 0..999 grid box to pixel coordinates, kept inside the image."""
    x1, y1, x2, y2 = box
    return (
        min(int(x1 / GRID_MAX * width), width - 1),
        min(int(y1 / GRID_MAX * height), height - 1),
        min(int(x2 / GRID_MAX * width), width - 1),
        min(int(y2 / GRID_MAX * height), height - 1),
    )


def draw_grounding(image: Image.Image, objects: list[GroundedObject]) -> Image.Image:
    """A copy of `image` with every box outlined and labelled, one palette colour per label."""
    canvas = image.convert("RGB")  # convert() always returns a copy
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    for index, grounded in enumerate(objects):
        colour = PALETTE[index % len(PALETTE)]
        for box in grounded.boxes:
            x1, y1, x2, y2 = to_pixel_box(box, canvas.width, canvas.height)
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=BOX_OUTLINE_WIDTH)
            draw.text((x1, max(y1 - LABEL_OFFSET_Y, 0)), grounded.label, fill=colour, font=font)
    return canvas


def render_grounding(text: str, image: Image.Image) -> Image.Image | None:
    """The boxes of `text` drawn on `image`, or None when the answer holds no box."""
    objects = parse_grounding(text)
    if not objects:
        return None
    return draw_grounding(image, objects)
