"""Tasks built on the shared engine: pre-training, fine-tuning, segmentation, layout."""
