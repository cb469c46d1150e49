"""The part Beyond the Transformer LM: state-space models and Mamba, retrieval-augmented
generation, reward models and RLHF with PPO, DPO, GRPO, and speculative decoding."""
