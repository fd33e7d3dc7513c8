"""TFDS builders writing ArrayRecord (no TensorFlow needed) for the grounding sources."""

from jaxgrounding.data.tfds.builder import GroundingBuilder, build, data_source, record_to_item

__all__ = ["GroundingBuilder", "build", "data_source", "record_to_item"]
