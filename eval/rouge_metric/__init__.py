"""A local copy of the `rouge` evaluation module: `evaluate.load(<this dir>)` works without a hub."""
