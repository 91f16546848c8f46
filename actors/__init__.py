"""Supervised asyncio actors: the runtime and one actor per module."""
