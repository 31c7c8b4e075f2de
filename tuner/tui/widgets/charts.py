"""Text charts for panels: sparklines, bars and heat cells (plain characters, readable without colour)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"
SHADES = " ░▒▓█"
HEAT_STYLES = ("grey30", "blue", "cyan", "green", "yellow", "dark_orange", "red", "bold red")


def numbers(values: Sequence[object]) -> list[float | None]:
    """Numbers as floats, anything else as None."""
    return [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values]


def spark(values: Sequence[object], width: int, lo: float | None = None, hi: float | None = None) -> str:
    """The last ``width`` values as a block sparkline (a missing value is a space)."""
    if width <= 0:
        return ""
    xs = numbers(values)[-width:]
    finite = [x for x in xs if x is not None]
    if not finite:
        return ""
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    span = hi - lo
    out = []
    for x in xs:
        if x is None:
            out.append(" ")
        elif span <= 0:
            out.append(BLOCKS[len(BLOCKS) // 2])
        else:
            level = int((min(max(x, lo), hi) - lo) / span * (len(BLOCKS) - 1) + 0.5)
            out.append(BLOCKS[level])
    return "".join(out)


def bar(fraction: float | None, width: int) -> Text:
    """A horizontal gauge ``█████░░░`` for a fraction in [0, 1]."""
    if width <= 0:
        return Text("")
    if fraction is None:
        return Text("?" * min(width, 1), style="dim")
    filled = round(max(0.0, min(1.0, fraction)) * width)
    style = "green" if fraction < 0.75 else "yellow" if fraction < 0.9 else "red"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="grey42")


def heat_cell(ratio: float | None, width: int = 1) -> Text:
    """One cell of a heat map for a load ratio (1.0 = the mean): shade and colour both say how hot."""
    if ratio is None:
        return Text("·" * width, style="dim")
    level = max(0, min(len(HEAT_STYLES) - 1, int(ratio * 3)))  # 0, 1/3, ... ; >= 2.33x the mean is the top
    shade = SHADES[min(len(SHADES) - 1, 1 + int(min(ratio, 2.0) * 1.5))] if ratio > 0 else "·"
    return Text(shade * width, style=HEAT_STYLES[level])


def heat_row(label: str, ratios: Sequence[float | None], width: int = 1) -> Text:
    """A heat-map row: ``label`` then one cell per ratio (runs of equal cells share one span)."""
    out = Text(label)
    run_text, run_style = "", ""
    for ratio in ratios:
        cell = heat_cell(ratio, width)
        style = str(cell.style)
        if style != run_style and run_text:
            out.append(run_text, style=run_style)
            run_text = ""
        run_text += cell.plain
        run_style = style
    if run_text:
        out.append(run_text, style=run_style)
    return out
