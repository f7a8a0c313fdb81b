"""dotresize_fx: graph transforms that resize the width of PyTorch models."""
