"""The ophthalmic knowledge corpus and its Chroma index."""
