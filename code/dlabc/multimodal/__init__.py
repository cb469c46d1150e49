"""The part Self-supervised and multimodal: contrastive learning of image features
without labels (SimCLR, MoCo), masked autoencoders (MAE), and images and text in one
space (CLIP)."""
