"""The part Vision: the Vision Transformer, Swin, a pretrained network and transfer
learning, DETR, YOLO, segmentation with transformers, NeRF and PointNet."""
