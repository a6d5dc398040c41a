"""Hyper-SD in plain torch: schedules, samplers, LoRA file inspection, distillation.

This package imports nothing from ComfyUI, so it can be tested alone and used from
scripts. Sub-modules are imported on demand.
"""
__version__ = "0.1.0"
