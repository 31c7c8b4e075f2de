"""The README's screen samples (docs/screens/*.txt) are the current snapshots' text: regenerate them with
``python tests/screens_text.py`` after ``pytest tests/test_tui_snapshots.py --snapshot-update``."""

from __future__ import annotations

import pytest
from screens_text import OUT, SCREENS, render


@pytest.mark.parametrize("name", list(SCREENS))
def test_text_copy_matches_its_snapshot(name):
    copy = OUT / f"{SCREENS[name]}.txt"
    assert copy.exists(), f"{copy} is missing: run python tests/screens_text.py"
    assert copy.read_text(encoding="utf-8") == render(name), f"{copy} is stale: run python tests/screens_text.py"
