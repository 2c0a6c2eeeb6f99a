"""Conditioning: text encoders and tokenizers, class/segmentation/image embedders, the conditioner."""
