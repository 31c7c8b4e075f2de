"""btune's serving engine behind an OpenAI-compatible HTTP API (``python -m workloads.api_server``).

spec.py declares the options (torch-free: the console validates them before launch); text.py turns text into token
ids and back; worker.py builds the model and runs the engine in one background thread; http.py is the aiohttp
server; __main__.py puts them together. This package's __init__ imports nothing, so the console can read the spec.
"""
