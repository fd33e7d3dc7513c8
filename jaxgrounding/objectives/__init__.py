"""Training objectives: the LM loss over response tokens (later: structural-token and GRPO losses)."""
