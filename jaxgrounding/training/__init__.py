"""Training: the SFT and GRPO loops, optimizer set-up and Orbax checkpointing."""
