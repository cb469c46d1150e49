"""Part "Transformers": attention from scratch and with PyTorch, and what follows."""
