"""The part Efficient and reliable models: knowledge distillation, pruning and the
lottery ticket, quantization (int8, quantization-aware training, LLM.int8, 4-bit
weights, QLoRA), and uncertainty (MC dropout, deep ensembles, Bayes by backprop,
calibration, out-of-distribution detection)."""
