"""The command palette's provider: the current screen's key actions and extra commands, by name."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import partial

from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider

from tuner.tui.screens.base import BtuneScreen, Command


def described_bindings(owner: object) -> Iterator[Binding]:
    """The shown, described bindings a screen or app class declares (not those of focused widgets)."""
    for item in getattr(type(owner), "BINDINGS", []):
        binding = item if isinstance(item, Binding) else Binding(*item)
        if binding.description and binding.show and not binding.system:
            yield binding


def key_names(app: App[object], binding: Binding) -> str:
    """``esc, b``: every key of a binding as the footer shows it."""
    return ", ".join(app.get_key_display(replace(binding, key=k.strip())) for k in binding.key.split(","))


class ScreenCommands(Provider):
    """Every described key binding of the calling screen and of the app, plus the screen's own commands."""

    def commands(self) -> list[Command]:
        screen, app = self.screen, self.app
        out: list[Command] = []
        seen: set[str] = set()
        for owner in (screen, app):
            for binding in described_bindings(owner):
                name = binding.description
                if name in seen:
                    continue
                seen.add(name)
                action = partial(owner.run_action, binding.action)  # type: ignore[attr-defined]
                out.append((name, f"key: {key_names(app, binding)}", action))
        if isinstance(screen, BtuneScreen):
            out.extend(screen.commands())
        return out

    async def discover(self) -> Hits:
        for name, help_text, callback in self.commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
