"""Engine integrations: Hugging Face transformers (and, later, vLLM)."""
