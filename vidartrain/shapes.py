"""The geometry of the published Wan2.2-TI2V model and of its training clips, in one place and
without importing any model (the data side and the configuration read it).

A clip of F = 4k+1 frames at H x W pixels is k+1 latent frames of H/16 x W/16 (the VAE's stride),
and the DiT folds 1 x 2 x 2 latents into one token (its patch). The DiT's widths are `WanModel`'s
constructor defaults.
"""
VAE_STRIDE = (4, 16, 16)  # (time, height, width) of the real Wan2.2 VAE
DIT_PATCH_SIZE = (1, 2, 2)  # (time, height, width) latents per DiT token

# pixels per DiT token along height and width: the VAE's spatial stride times the DiT's patch
PIXELS_PER_TOKEN = VAE_STRIDE[1] * DIT_PATCH_SIZE[1]


def tokens_per_latent_frame(latent_hw: tuple[int, int]) -> int:
    """DiT tokens of one latent frame of `latent_hw` (height, width) latents."""
    return (latent_hw[0] // DIT_PATCH_SIZE[1]) * (latent_hw[1] // DIT_PATCH_SIZE[2])


# Stage 2's windows and causal generation: latent frame 0 is given (clean context), at least one
# more is predicted; in video frames, 1 + VAE_STRIDE[0] * (MIN_CAUSAL_LATENT_FRAMES - 1).
MIN_CAUSAL_LATENT_FRAMES = 2
MIN_CAUSAL_VIDEO_FRAMES = 1 + VAE_STRIDE[0] * (MIN_CAUSAL_LATENT_FRAMES - 1)

# The published training clips: 81 frames (21 latent frames) of 736 x 640 (height x width), the
# defaults of every clip setting (data.*, the loader's ClipSpec, pre-encoded windows).
CLIP_NUM_FRAMES, CLIP_HEIGHT, CLIP_WIDTH = 81, 736, 640
