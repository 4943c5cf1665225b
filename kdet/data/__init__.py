"""Data sources, augmentation and input pipelines."""
