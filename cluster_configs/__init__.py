"""The cluster config catalogue, shipped as package data (read through importlib.resources)."""
