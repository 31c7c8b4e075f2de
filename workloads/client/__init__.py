"""A load-test client for servers speaking the OpenAI API (``btune run serve --endpoint URL``); torch-free.

``sse``: the Server-Sent Events parser. ``payload``: request bodies and the probe of optional fields.
``prompts``: synthetic or file prompts. ``load``: the load itself, in its own thread and asyncio loop.
"""
