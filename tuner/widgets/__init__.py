"""The app's widgets: one panel per file, the feed they render from, and the launch form."""
