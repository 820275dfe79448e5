"""Serving many requests on one model: the engine and its thread, scheduler, request stages, model
runner, prefix cache, sampling, settings and calibration. Imports model, inputs and compute.
"""
