"""The network: config, vision tower, projector, language model, strict checkpoint loading, random
weights, and the module swaps for quantized weights. Imports only compute.
"""
