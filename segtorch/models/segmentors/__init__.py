"""Whole segmentation networks (backbone + decode head), one module per family; ``base`` holds what they share."""
