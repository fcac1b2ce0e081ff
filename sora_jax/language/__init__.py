"""Language models the pipeline talks to: local transformers models and OpenAI-compatible endpoints."""
