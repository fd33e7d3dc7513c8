"""Task formats: MeCo's structural-token targets and frame assignment, and the instruction templates."""
