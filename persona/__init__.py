"""The House persona: pack, prompt building, post-processing, data, training, evaluation."""
