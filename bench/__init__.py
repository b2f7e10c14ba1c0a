"""Benchmarks and the main job; each module also runs as a script (``python bench/NAME.py``)."""
