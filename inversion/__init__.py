"""Inversion."""
