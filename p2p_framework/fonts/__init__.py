"""Fonts shipped with p2p-framework: DejaVu Sans (``DejaVuSans.ttf``, 742 KiB, Bitstream Vera
license, see ``LICENSE-DejaVu.txt``), so that grid and attention-image captions draw accented
letters, Greek and Cyrillic on every machine, not boxes."""

from __future__ import annotations

from pathlib import Path

#: The caption font.
CAPTION_FONT = Path(__file__).with_name("DejaVuSans.ttf")

__all__ = ["CAPTION_FONT"]
