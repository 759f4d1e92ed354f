"""Dataset sources, FFCV writing and loading, and batched augmentations."""
