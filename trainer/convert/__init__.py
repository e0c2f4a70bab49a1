"""Weight converters between this project's modules (CompVis layout) and other formats."""
