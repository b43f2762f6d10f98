"""OpenAI-compatible HTTP serving of nugget2d (the server arrives with its own issue)."""
