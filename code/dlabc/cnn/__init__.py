"""Part "CNNs": convolution and pooling, CNN classifiers, convolution variants,
ResNet and the classic architectures, U-Net."""
