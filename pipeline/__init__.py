"""Thin stage entry points that wire the resattn library to DVC, Ray and MLflow."""
