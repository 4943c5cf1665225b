"""Detection metrics: COCO, VOC and reports."""
