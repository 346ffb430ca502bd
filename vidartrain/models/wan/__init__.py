from vidartrain.models.wan.t5 import UMT5Encoder, load_umt5_encoder
from vidartrain.models.wan.vae import WanVAE, latent_shape
from vidartrain.models.wan.model import WanModel, latent_grid, num_tokens
from vidartrain.models.wan.checkpoint import download_checkpoints, load_finetuned
from vidartrain.models.wan.causal import WanModelCausal
from vidartrain.models.wan.kv_cache import KVCache
