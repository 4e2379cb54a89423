"""Thin typed wrappers over kernel interfaces (loop, device-mapper, block, files). No policy."""
