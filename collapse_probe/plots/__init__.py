"""Figures: the spike timeline, the gradient pressure, shared style."""
