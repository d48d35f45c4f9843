"""Low-level ops: the SSIM Gaussian filters (band-matrix and fused Triton) and a faster ROIAlign."""
