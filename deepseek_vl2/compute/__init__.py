"""How a product runs on its device: the CPU's execution choices, and the int8/int4 weight formats
with their kernels. Imports nothing from the package.
"""
