"""Visita dashboard package."""
