"""erc: multimodal Emotion Recognition in Conversation."""

__version__ = "0.1.0"
