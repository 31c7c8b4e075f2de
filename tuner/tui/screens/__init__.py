"""The app's screens: launch, live, runs (history), replay, compare, and small dialogs."""
