"""Command-line tools of the fixed-context diagnostic (wiring only; the math is one level up)."""
