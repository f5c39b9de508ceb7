"""Pictures of what the scripts measure, drawn with pillow alone (no plotting library).

Not from the paper: ours, for the reader. `python losses.py` draws the void picture of
METHOD.md 3 (`curves`); `python train.py` draws results.png (`results_chart`) and scenes.png
(`scene_sheet`) beside results.json. Each function takes plain numbers and writes one PNG.
"""
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"teacher": (40, 40, 40), "base": (150, 150, 150), "vcd": (90, 150, 210),
           "seed_forward": (235, 150, 50), "seed_reverse": (200, 50, 50),
           "seed_reverse_vcd": (120, 40, 120)}
VOID = (235, 225, 240)


def _font(size):
    return ImageFont.load_default(size=size)


def _save(image, path):
    """The PNG written under a temporary name and renamed: a full disk never leaves half a picture
    under its name."""
    import os

    tmp = path + ".tmp.png"
    try:
        image.save(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def curves(x, series, path, title, shade=None, size=(760, 420)):
    """Line plot: series = {label: (ys, colour)} over the same x; shade = (x0, x1), the void."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 40, size[0] - 20, size[1] - 40
    top_y = max(max(ys) for ys, _ in series.values()) * 1.1
    px = lambda v: left + (v - x[0]) / (x[-1] - x[0]) * (right - left)  # noqa: E731
    py = lambda v: bottom - v / top_y * (bottom - top)  # noqa: E731
    if shade:
        draw.rectangle([px(shade[0]), top, px(shade[1]), bottom], fill=VOID)
        draw.text((px(shade[0]) + 4, bottom - 20), "void (pt = 0)", fill=(120, 80, 140),
                  font=_font(13))
    draw.line([left, bottom, right, bottom], fill="black")
    draw.line([left, top, left, bottom], fill="black")
    for value in (x[0], 0.0, x[-1]):
        draw.text((px(value) - 8, bottom + 6), f"{value:g}", fill="black", font=_font(12))
    for row, (label, (ys, colour)) in enumerate(series.items()):
        draw.line([(px(a), py(b)) for a, b in zip(x, ys)], fill=colour, width=3)
        draw.line([left + 15, top + 12 + 20 * row, left + 40, top + 12 + 20 * row], fill=colour,
                  width=3)
        draw.text((left + 47, top + 5 + 20 * row), label, fill="black", font=_font(13))
    draw.text((left, 10), title, fill="black", font=_font(15))
    _save(image, path)


def results_chart(rows, splits, void_mass, path):
    """Grouped bars: F1 per split, greedy and sampled, for each row; then each row's void mass.

    rows: {method: {"label": str, "greedy": {split: f1}, "sample": {split: f1}}} (F1 in %);
    void_mass: {method: % of the student's mass on the purified teacher's voids}.
    """
    groups = [(decoding, split) for decoding in ("greedy", "sample") for split in splits]
    image = Image.new("RGB", (140 * len(groups) + 260, 460), "white")
    draw = ImageDraw.Draw(image)
    bottom, top = 400, 60
    values = [r[d][s] for r in rows.values() for d, s in groups]
    low = 5 * int(min(values) // 5) - 5  # bars start near the smallest F1, so differences show
    high = 5 * int(max(values) // 5) + 5
    py = lambda v: bottom - (v - low) / (high - low) * (bottom - top)  # noqa: E731
    width = 100 // len(rows)
    for g, (decoding, split) in enumerate(groups):
        x0 = 50 + 140 * g
        for i, (method, r) in enumerate(rows.items()):
            value = r[decoding][split]
            draw.rectangle([x0 + i * width, py(value), x0 + (i + 1) * width - 3, bottom],
                           fill=COLOURS[method])
        draw.text((x0, bottom + 8), f"{split}\n{decoding}", fill="black", font=_font(12))
    for tick in range(low, high + 1, 5):
        draw.text((8, py(tick) - 7), f"{tick}", fill=(90, 90, 90), font=_font(11))
        draw.line([40, py(tick), 50 + 140 * len(groups) - 30, py(tick)], fill=(225, 225, 225))
    # void mass: its own small panel, on its own scale
    # all zero: flat bars
    x0, most = 50 + 140 * len(groups) + 10, max(max(void_mass.values(), default=0), 1e-9)
    for i, (method, mass) in enumerate(void_mass.items()):
        y = bottom - mass / most * (bottom - top - 40)
        draw.rectangle([x0 + i * 40, y, x0 + i * 40 + 30, bottom], fill=COLOURS[method])
        draw.text((x0 + i * 40, y - 16), f"{mass:.2f}", fill="black", font=_font(11))
    draw.text((x0, bottom + 8), "void mass %", fill="black", font=_font(12))
    for i, r in enumerate(rows.values()):
        draw.rectangle([50 + 170 * i, 15, 64 + 170 * i, 29], fill=COLOURS[list(rows)[i]])
        draw.text((70 + 170 * i, 14), r["label"], fill="black", font=_font(13))
    draw.text((50, 36), f"POPE F1 % (axis from {low})", fill=(90, 90, 90), font=_font(12))
    _save(image, path)


def scene_sheet(cards, path, title, side=160):
    """A sheet of held-out scenes, each with a question and the answers of two models (green:
    right).

    cards: [(PIL image, question, truth, base answer, SEED answer)].
    """
    columns = min(4, len(cards))
    card_w, card_h = max(side, 230) + 20, side + 78
    rows = -(-len(cards) // columns)
    sheet = Image.new("RGB", (columns * card_w, rows * card_h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), title, fill="black", font=_font(14))
    for i, (image, question, truth, base, seed) in enumerate(cards):
        x, y = (i % columns) * card_w + 10, (i // columns) * card_h + 38
        # toy scenes are 32 pixels: enlarge them without blurring; photos are shrunk smoothly
        sheet.paste(image.resize((side, side),
                                 Image.NEAREST if image.width < side else Image.BILINEAR), (x, y))
        draw.text((x, y + side + 4), question, fill="black", font=_font(12))
        for line, (who, answer) in enumerate((("base", base), ("SEED", seed))):
            colour = (30, 140, 60) if answer == truth else (200, 40, 40)
            draw.text((x, y + side + 22 + 16 * line), f"{who}: {answer}", fill=colour,
                      font=_font(13))
        draw.text((x + 120, y + side + 22), f"truth: {truth}", fill=(90, 90, 90), font=_font(13))
    _save(sheet, path)
