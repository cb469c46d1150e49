"""The Reinforcement learning part."""
