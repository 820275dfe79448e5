"""The service's edges: the command line, the local Cog server launcher, the OpenAPI schema and
weight download. Imports every layer below.
"""
