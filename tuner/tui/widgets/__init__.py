"""The app's widgets: one panel per file and the launch form; the feed they render from is tuner.feed."""
