"""Networks (DeepEM3D, residual and strided U-Nets), the registry that builds them, and the
model card."""
