"""``seglab export``: a label source of a store as a dataset other training stacks load
(export.py runs it; formats.py names the formats and their writers)."""
