"""Part "Transformer improvements since 2017": from the 2017 block to today's LLMs."""
