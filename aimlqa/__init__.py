"""aimlqa: question answering for an AI/ML course."""

__version__ = "0.1.0"
