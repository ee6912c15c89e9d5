"""Text that shows nothing: whitespace, zero-width, format and control characters.

Data validation (`rft_core.data`) refuses a prompt or an answer made only of them, and so does the
served model (`rft_core.tracking.models`): this module depends on nothing but the standard library,
so that a logged model can use it without the data layer's dependencies.
"""

from __future__ import annotations

import unicodedata

# Code points that show nothing but are not whitespace or format/control characters: Unicode's
# other default-ignorables (combining grapheme joiner, Hangul fillers, Khmer inherent vowels,
# Mongolian free variation selectors, variation selectors) and the blank Braille pattern.
_OTHER_INVISIBLE = frozenset(
    chr(code)
    for code in (
        0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0,
        *range(0x180B, 0x1810), *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0),
    )
)
# Whitespace and separators (Z*), controls (Cc), format characters (Cf: zero-width space and
# joiners U+200B-U+200D, word joiner U+2060, BOM U+FEFF, bidi marks, soft hyphen, tag characters).
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def is_invisible(char: str) -> bool:
    """Whether one character shows nothing on its own (whitespace, zero-width, format, control)."""
    return char.isspace() or char in _OTHER_INVISIBLE or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def is_blank(text: str) -> bool:
    """Whether a text shows nothing: empty, or only whitespace and invisible characters.

    >>> is_blank(" \u200b\u2060\ufeff "), is_blank("\u200bx")
    (True, False)
    """
    return all(is_invisible(char) for char in text)


def invisible_names(text: str, limit: int = 3) -> str:
    """'U+200B ZERO WIDTH SPACE, U+2060 WORD JOINER': the distinct non-space characters of a blank text."""
    chars = list(dict.fromkeys(char for char in text if not char.isspace()))
    shown = [f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in chars[:limit]]
    return ", ".join(shown) + (f" and {len(chars) - limit} more" if len(chars) > limit else "")
