"""The Semantic VAE: the model that compresses DINOv2 features into SFD's semantic channels (``model.py``:
architecture, loss, checkpoint files) and its own trainer (``train.py``: typed config, loop, resume).
Extraction (``data/encoders.py``) loads a trained one; nothing here reads training latents."""
