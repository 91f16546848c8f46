"""Benchmarks: hearth against a bare aiohttp floor and python-socketio, in one run."""
