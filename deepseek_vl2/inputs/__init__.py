"""From a request to model inputs and back: tokenizer, conversation template, image decoding and
tiling, the processor, grounding boxes. Imports nothing from the package.
"""
