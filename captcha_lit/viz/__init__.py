"""Pictures: sample grids and galleries, error analysis, t-SNE of learned features."""
