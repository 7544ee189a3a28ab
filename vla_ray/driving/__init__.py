"""Driving-specific parts that are not model layers (controllers)."""
