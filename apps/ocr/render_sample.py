#!/usr/bin/env python3
"""Render the OCR app's sample image: known text in a 5x7 dot font, scaled up and
softened, as a grayscale PNG (standard library only, deterministic output).

    python3 render_sample.py "HELLO FORAGE CLOUDLET" > samples/hello.png

The probe in app.json carries this image, base64-encoded, as its request; the expected
words are the text's.
"""
import struct
import sys
import zlib

# 5x7 glyphs, one string of 7 rows per character ('#' = ink).
FONT = {
    "A": [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "B": ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
    "C": [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."],
    "D": ["####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."],
    "E": ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
    "F": ["#####", "#....", "#....", "####.", "#....", "#....", "#...."],
    "G": [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"],
    "H": ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "I": [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "K": ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
    "L": ["#....", "#....", "#....", "#....", "#....", "#....", "#####"],
    "M": ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
    "N": ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"],
    "O": [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    "P": ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."],
    "R": ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
    "S": [".####", "#....", "#....", ".###.", "....#", "....#", "####."],
    "T": ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
    "U": ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    "V": ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
    "W": ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."],
    "Y": ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."],
    " ": ["....."] * 7,
}
SCALE = 6
MARGIN = 24


def render(text):
    cols = []
    for ch in text.upper():
        glyph = FONT[ch]
        for x in range(5):
            cols.append([glyph[y][x] == "#" for y in range(7)])
        cols.append([False] * 7)  # one dot of space between characters
    width = len(cols) * SCALE + 2 * MARGIN
    height = 7 * SCALE + 2 * MARGIN
    ink = [[0.0] * width for _ in range(height)]
    for cx, col in enumerate(cols):
        for cy, on in enumerate(col):
            if on:
                for y in range(cy * SCALE, (cy + 1) * SCALE):
                    for x in range(cx * SCALE, (cx + 1) * SCALE):
                        ink[MARGIN + y][MARGIN + x] = 1.0
    # A 3x3 box blur: soft edges, as a printed and scanned glyph has.
    soft = [[0.0] * width for _ in range(height)]
    for y in range(1, height - 1):
        for x in range(1, width - 1):
            soft[y][x] = sum(ink[y + dy][x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
    rows = [bytes(255 - int(round(v * 255)) for v in row) for row in soft]
    return width, height, rows


def png(width, height, rows):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


if __name__ == "__main__":
    text = sys.argv[1] if len(sys.argv) > 1 else "HELLO FORAGE CLOUDLET"
    sys.stdout.buffer.write(png(*render(text)))
