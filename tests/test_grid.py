import numpy as np
from PIL import Image

from common.grid import LINE_HEIGHT, make_grid


def _words_drawn(sheet: Image.Image, top: int, min_gap: int = 3) -> int:
    """Runs of ink in one label line separated by at least `min_gap` blank columns."""
    line = np.asarray(sheet.convert("L"))[top : top + LINE_HEIGHT] < 128
    inked = line.any(axis=0)
    words, blank = 0, min_gap
    for column in inked:
        if column and blank >= min_gap:
            words += 1
        blank = 0 if column else blank + 1
    return words


def test_label_words_do_not_run_together():
    picture = Image.new("RGB", (16, 16), (200, 200, 200))
    sheet = make_grid([picture, picture], ["a blue ball on grass", "in front of a brick wall"], columns=2)
    top = 4 + 128 + 1  # pad, cell, gap
    left, right = sheet.crop((0, 0, 4 + 128, sheet.height)), sheet.crop((4 + 128 + 2, 0, sheet.width, sheet.height))
    assert _words_drawn(left, top) == 5
    assert _words_drawn(right, top) + _words_drawn(right, top + LINE_HEIGHT) == 6


def test_long_labels_wrap_within_their_cell():
    picture = Image.new("RGB", (16, 16), (200, 200, 200))
    label = "a large blue ball on the grass, on the left, with a supercalifragilisticexpialidocious sky"
    sheet = make_grid([picture], [label], cell=64)
    ink = np.asarray(sheet.convert("L"))[4 + 64 :] < 128
    assert ink.any() and not ink[:, 4 + 64 + 1 :].any()  # nothing drawn past the cell's right edge
