"""Long-video memory: TimeScope HVR pooling of per-layer keys and values."""
