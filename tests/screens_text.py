"""Text copies of the app's snapshot screens for the README (docs/screens/*.txt).

The snapshot tests render every screen from recorded runs and keep the SVGs under tests/__snapshots__; this
module turns chosen ones into plain text (the SVG's text runs, placed on their character grid). Run it from
the repository root after updating snapshots: ``python tests/screens_text.py``; tests/test_readme_screens.py
fails while a text copy differs from its snapshot.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "tests" / "__snapshots__" / "test_tui_snapshots"
OUT = ROOT / "docs" / "screens"
#: snapshot name -> text file name
SCREENS = {
    "test_launch_screen": "launch",
    "test_live_screen_after_a_run[dense-80x24]": "live-dense-80x24",
    "test_live_screen_after_a_run[moe-80x24]": "live-moe-80x24",
    "test_live_screen_after_a_run[serve-80x24]": "live-serve-80x24",
    "test_live_screen_after_a_run[tp-validate-80x24]": "live-tp-validate-80x24",
    "test_runs_screen": "runs",
    "test_compare_screen": "compare",
    "test_replay_eight_gpus[120x40]": "replay-8-gpus-120x40",
}
_TEXT = re.compile(r'<text[^>]*\bx="([\d.]+)"[^>]*\by="([\d.]+)"[^>]*>([^<]*)</text>')
_CHAR_W = 12.2  # Textual's SVG export: 12.2 px per cell


def svg_to_text(svg: str) -> str:
    """The screen's characters, one line per row, trailing blanks removed."""
    rows: dict[float, list[tuple[float, str]]] = {}
    for m in _TEXT.finditer(svg):
        rows.setdefault(float(m.group(2)), []).append((float(m.group(1)), html.unescape(m.group(3))))
    lines = []
    for y in sorted(rows):
        line = ""
        for x, text in sorted(rows[y]):
            line = line.ljust(round(x / _CHAR_W)) + text
        lines.append(line.replace("\xa0", " ").rstrip())
    return "\n".join(lines).rstrip() + "\n"


def render(name: str) -> str:
    return svg_to_text((SNAPSHOTS / f"{name}.svg").read_text(encoding="utf-8"))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, out in SCREENS.items():
        (OUT / f"{out}.txt").write_text(render(name), encoding="utf-8")
        print(f"docs/screens/{out}.txt")


if __name__ == "__main__":
    main()
