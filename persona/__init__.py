"""The runtime House persona: pack, prompt building, post-processing, reply choice (canon
pool, selector, persona classifier) and the prepared data they read."""
