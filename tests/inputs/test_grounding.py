"""deepseek_vl2.inputs.grounding: parsing <|ref|>/<|det|> answers and drawing the boxes."""

from __future__ import annotations

from PIL import Image

from deepseek_vl2.inputs.grounding import (
    PALETTE, GroundedObject, draw_grounding, parse_grounding, render_grounding, to_pixel_box,
)  # fmt: skip

GIRAFFE = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"


def test_parses_the_readme_example() -> None:
    assert parse_grounding(GIRAFFE + "<｜end▁of▁sentence｜>") == [
        GroundedObject("The giraffe at the back.", ((580, 270, 999, 900),))
    ]


def test_parses_several_labels_and_boxes_in_order() -> None:
    text = (
        "There are <|ref|>two cats<|/ref|><|det|>[[1,2,3,4], [10, 20, 30, 40]]<|/det|> and "
        "<|ref|>a dog<|/ref|>\n<|det|>[[500,500,600,600]]<|/det|>."
    )
    assert parse_grounding(text) == [
        GroundedObject("two cats", ((1, 2, 3, 4), (10, 20, 30, 40))),
        GroundedObject("a dog", ((500, 500, 600, 600),)),
    ]


def test_malformed_boxes_are_skipped_and_valid_ones_kept() -> None:
    text = (
        "<|ref|>mixed<|/ref|><|det|>[[1, 2, 3], [a, b, c, d], [5, 6, 7, 8], [1,2,3,4,5], "
        "[nan, 1, 2, 3]]<|/det|>"
        "<|ref|>nothing valid<|/ref|><|det|>[[1, 2]]<|/det|>"
        "<|ref|>unclosed<|/ref|><|det|>[[1, 2, 3, 4]] "
        "<|ref|>after unclosed<|/ref|><|det|>[[9, 9, 9, 9]]<|/det|>"
    )
    assert parse_grounding(text) == [
        GroundedObject("mixed", ((5, 6, 7, 8),)),
        GroundedObject("after unclosed", ((9, 9, 9, 9),)),
    ]


def test_ref_without_boxes_is_plain_text() -> None:
    text = "<|ref|>mentioned only<|/ref|> and <|ref|>located<|/ref|><|det|>[[0,0,9,9]]<|/det|>"
    assert parse_grounding(text) == [GroundedObject("located", ((0, 0, 9, 9),))]


def test_out_of_range_coordinates_are_clamped_and_reversed_corners_swapped() -> None:
    text = "<|ref|>x<|/ref|><|det|>[[1200, -5, 300.7, 40]]<|/det|>"
    assert parse_grounding(text) == [GroundedObject("x", ((300, 0, 999, 40),))]


def test_text_without_grounding_gives_nothing() -> None:
    assert parse_grounding("A plain answer with [1, 2, 3, 4] in it.") == []
    assert render_grounding("A plain answer.", Image.new("RGB", (10, 10))) is None


def test_grid_to_pixels_uses_the_image_size() -> None:
    assert to_pixel_box((0, 0, 999, 999), 640, 480) == (0, 0, 639, 479)
    assert to_pixel_box((580, 270, 999, 900), 1000, 500) == (580, 135, 999, 450)
    # int() truncates like the reference: 500/999*100 = 50.05 -> 50
    assert to_pixel_box((500, 500, 500, 500), 100, 100) == (50, 50, 50, 50)


def test_boxes_are_drawn_in_palette_colours_on_a_copy() -> None:
    image = Image.new("RGB", (1000, 1000), (0, 0, 0))
    objects = [
        GroundedObject("first", ((100, 300, 400, 600),)),
        GroundedObject("second", ((600, 600, 900, 900), (500, 100, 700, 200))),
    ]
    drawn = draw_grounding(image, objects)
    assert image.getpixel((100, 450)) == (0, 0, 0), "the input image must stay untouched"

    # Pixel box of (100, 300, 400, 600) on 1000x1000: (100, 300, 400, 600).
    red, green = PALETTE[0], PALETTE[1]
    assert drawn.getpixel((100, 450)) == red  # left edge
    assert drawn.getpixel((102, 450)) == red  # outline is 3 px wide
    assert drawn.getpixel((104, 450)) == (0, 0, 0)  # inside stays untouched
    assert drawn.getpixel((250, 600)) == red  # bottom edge
    assert drawn.getpixel((900, 750)) == green  # right edge of the second label's box
    assert drawn.getpixel((600, 100)) == green  # second box of the same label, same colour


def test_label_is_drawn_above_the_box_in_its_colour() -> None:
    image = Image.new("RGB", (1000, 1000), (0, 0, 0))
    drawn = draw_grounding(image, [GroundedObject("LABEL", ((200, 500, 800, 900),))])
    strip = drawn.crop((200, 480, 400, 499))  # the 20 px above the top edge at y=500
    assert PALETTE[0] in {colour for _, colour in strip.getcolors(maxcolors=100_000)}


def test_label_at_the_top_edge_stays_inside_the_image() -> None:
    image = Image.new("RGB", (1000, 1000), (0, 0, 0))
    drawn = draw_grounding(image, [GroundedObject("TOP", ((200, 0, 800, 500),))])
    text_area = drawn.crop((205, 5, 300, 20))  # inside the box, where the label is pushed
    assert PALETTE[0] in {colour for _, colour in text_area.getcolors(maxcolors=100_000)}


def test_palette_cycles_after_thirteen_labels() -> None:
    image = Image.new("RGB", (1400, 100), (0, 0, 0))
    objects = [GroundedObject(f"o{i}", ((i * 70 + 5, 500, i * 70 + 60, 900),)) for i in range(14)]
    drawn = draw_grounding(image, objects)
    edge_y = 80  # inside the vertical span of every box
    first_left = to_pixel_box(objects[0].boxes[0], 1400, 100)[0]
    last_left = to_pixel_box(objects[13].boxes[0], 1400, 100)[0]
    assert len(PALETTE) == 13
    assert drawn.getpixel((first_left, edge_y)) == PALETTE[0]
    assert drawn.getpixel((last_left, edge_y)) == PALETTE[0]


def test_render_grounding_draws_on_the_given_image() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    drawn = render_grounding(GIRAFFE, image)
    assert drawn is not None and drawn.size == (200, 100)
    x1, y1, _, _ = to_pixel_box((580, 270, 999, 900), 200, 100)
    assert drawn.getpixel((x1, y1 + 10)) == PALETTE[0]
