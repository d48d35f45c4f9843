"""Data: generated COCO-format scenes and the mixed-sample mapper."""
