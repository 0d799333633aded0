"""Model tools: convert, population statistics, harden and fuse, importance, official checkpoints, WS."""
