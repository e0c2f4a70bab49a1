"""FID / CLIP-score evaluation on a pinned protocol (issue 7)."""
