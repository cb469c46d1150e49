"""Part "Foundations": tensors and autograd, and what every later part stands on."""
