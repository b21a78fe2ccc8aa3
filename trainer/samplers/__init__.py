"""Samplers: plain functions over (model, noise, schedule, guidance)."""
