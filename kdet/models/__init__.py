"""Detection models: anchors, backbones, heads, SSD."""
