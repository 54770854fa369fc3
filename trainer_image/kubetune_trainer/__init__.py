"""kubetune trainer: QLoRA/LoRA SFT entrypoint and its config schema."""
