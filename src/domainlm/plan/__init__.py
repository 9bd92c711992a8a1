"""Compute planning: scaling laws, hardware, memory, model shape, the plan and its chart."""
