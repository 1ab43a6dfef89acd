"""The side-by-side benchmark: `python -m bench [--quick]` (see DESIGN.md, Performance)."""
