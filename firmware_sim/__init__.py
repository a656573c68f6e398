"""Visita firmware_sim package."""
