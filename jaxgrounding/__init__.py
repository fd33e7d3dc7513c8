"""jaxgrounding: temporal video grounding with video LLMs in JAX."""
