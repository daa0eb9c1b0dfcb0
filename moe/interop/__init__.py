"""The model in other ecosystems: export as a Hugging Face transformers model."""
