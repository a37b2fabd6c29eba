"""OpenAI-compatible HTTP server: `sharekv serve`."""
