"""Embedders: one class per kind of conditioning input (captions, class maps, images, labels); see ``base``."""
