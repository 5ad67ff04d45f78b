"""The converters: COCO 2014, VOC 2007 and CSV into the TFRecord schema (docs/data.md)."""
