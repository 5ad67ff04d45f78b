"""Dataset converters (COCO 2014, VOC 2007, CSV) into the TFRecord schema."""
