"""``propd serve``: the OpenAI-compatible HTTP server, its decode thread and metrics, and ``propd load``."""
