"""Ray actor classes, one role a file; plain classes, heavy imports inside methods (docs/design.md)."""
