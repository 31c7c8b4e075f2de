"""The Textual app, the top layer: it imports the console core, never the other way round.

``btune-tui`` starts in tuner.tui.main, which imports textual only when the app starts (``--replay`` is headless).
"""
