"""Part "Transformers": attention from scratch, attention with PyTorch, and what follows."""
