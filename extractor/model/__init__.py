"""The model stage: checkpoint → tower (+ LoRA merged) → log-mel and encoder on the device.

    config.py      what config.json and adapter_config.json say (no torch)
    checkpoint.py  the tower's tensors, and nothing else of the checkpoint; fingerprints
    lora.py        the adapter merge
    logmel.py      WhisperFeatureExtractor's log-mel, batched in torch
    encoder.py     the tower over packed variable-length windows
    load.py        all of it, on a device: LoadedModel
"""
