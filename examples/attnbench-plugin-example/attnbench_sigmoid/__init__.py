"""Sigmoid attention for attnbench: an example of a variant shipped as its own package."""
