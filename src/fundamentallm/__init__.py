"""FundamentaLLM: train decoder-only transformer language models from scratch, from the command line."""

__version__ = "0.1.0"
