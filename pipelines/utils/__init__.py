"""Helpers both packages share: files, output checks, console, progress (docs/data.md)."""
