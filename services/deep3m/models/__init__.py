"""Networks (DeepEM3D, residual U-Nets), the registry that builds them, and the model card."""
