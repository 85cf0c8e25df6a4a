"""batchd: moves non-interactive LLM calls onto the providers' batch APIs."""

__version__ = "0.1.0"
