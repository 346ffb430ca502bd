from vidartrain.models.wan.t5 import UMT5Encoder, load_umt5_encoder
