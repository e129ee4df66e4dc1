"""One trainer, one recipe per model family (recipes are YAML data, not code)."""
