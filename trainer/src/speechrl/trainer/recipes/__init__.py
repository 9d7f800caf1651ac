"""What the demo and the reproductions need beyond the trainer: corpora, warm starts, Token2Reward
training, the reproductions and `speechrl demo`. Nothing outside this package imports it."""
