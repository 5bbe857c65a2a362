"""Checkpoints in Hugging Face layout: load (load.py), save (save.py), export and FP8 export (export.py,
fp8_export.py). The model calls save.py for `save_pretrained`; load.py builds the model, so it sits above it."""
