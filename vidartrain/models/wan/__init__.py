from vidartrain.models.wan.t5 import UMT5Encoder, load_umt5_encoder
from vidartrain.models.wan.vae import WanVAE, latent_shape
